"""Test oracle: a plain-numpy transcription of ../shared/ALGORITHMS.md (small_fc_lopt, VeLO).

Written from the document alone (no torch, nothing from lopt_codegen), so that the reference
backend can be checked against it. All math is float32, as the document asks; "doc:" comments
quote the rule each line implements.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

F32 = np.float32
Array = np.ndarray


# ---------------------------------------------------------------------------------------------
# Shared building blocks
# ---------------------------------------------------------------------------------------------
def _rsqrt(x: Array) -> Array:
    return F32(1.0) / np.sqrt(x)


def safe_rsqrt(x: Array) -> Array:
    return _rsqrt(np.maximum(x, F32(1e-9)))  # doc: safe_rsqrt(x) = rsqrt(max(x, 1e-9))


def normalize(x: Array) -> Array:
    # doc: x * rsqrt(mean(x^2) + 1e-5), the mean over the whole tensor
    return x * _rsqrt(np.mean(x * x) + F32(1e-5))


def relu(x: Array) -> Array:
    return np.maximum(x, F32(0.0))


def sigmoid(x: Array) -> Array:
    with np.errstate(over="ignore"):
        return F32(1.0) / (F32(1.0) + np.exp(-x))


def factored_axes(shape: tuple[int, ...], velo_tie_rule: bool) -> tuple[int, int] | None:
    """(d0, d1): d0 the largest axis, d1 the second largest, by a stable argsort; None if rank < 2."""
    if len(shape) < 2:
        return None
    # kind="stable" matters: numpy 2's default argsort is not stable (it sorts (3, 3, 2, 2) as [3, 2, 1, 0])
    order = np.argsort(np.asarray(shape), kind="stable")
    d1, d0 = int(order[-2]), int(order[-1])  # doc: equal sizes -> the lower index is d1
    if velo_tie_rule and shape[d0] == shape[d1] and not (len(shape) == 4 and (d1, d0) == (0, 1)):
        d0, d1 = d1, d0  # doc (VeLO): on a tie the axes swap roles, except a 4-D tie on (0, 1)
    return d0, d1


@dataclass
class TensorState:
    """Accumulators of one tensor: 3 momenta, 1 rms, 3 Adafactor accumulators (all start at 0)."""
    shape: tuple[int, ...]
    axes: tuple[int, int] | None
    m: list[Array] = field(default_factory=list)
    v: Array | None = None
    vr: list[Array] = field(default_factory=list)  # factored: shape without d0
    vc: list[Array] = field(default_factory=list)  # factored: shape without d1
    vf: list[Array] = field(default_factory=list)  # unfactored: full shape

    def __post_init__(self) -> None:
        zeros = lambda s: np.zeros(s, F32)  # noqa: E731
        self.m = [zeros(self.shape) for _ in range(3)]
        self.v = zeros(self.shape)
        if self.axes is None:
            self.vf = [zeros(self.shape) for _ in range(3)]
        else:
            d0, d1 = self.axes
            self.vr = [zeros(tuple(n for i, n in enumerate(self.shape) if i != d0)) for _ in range(3)]
            self.vc = [zeros(tuple(n for i, n in enumerate(self.shape) if i != d1)) for _ in range(3)]


def accumulate(st: TensorState, g: Array, b_m: Array, b_v: F32, b_f: Array,
               fac_mom_eps: float) -> dict[str, list[Array]]:
    """Updates st in place with gradient g; returns the per-element features built from the
    accumulators *after* the update (doc: "features use the accumulators after this step's update")."""
    for k in range(3):  # doc: m_k <- b_k m_k + (1 - b_k) g
        st.m[k] = b_m[k] * st.m[k] + (F32(1.0) - b_m[k]) * g
    st.v = b_v * st.v + (F32(1.0) - b_v) * (g * g)  # doc: v <- b v + (1 - b) g^2
    rsq = _rsqrt(st.v + F32(1e-6))  # doc: rsq = rsqrt(v + 1e-6)
    gs = g * g + F32(1e-30)  # doc: gs = g^2 + 1e-30
    fac_g, row_feat, col_feat, fac_mom = [], [], [], []
    for k in range(3):
        b = b_f[k]
        if st.axes is None:  # doc: rank < 2, unfactored
            st.vf[k] = b * st.vf[k] + (F32(1.0) - b) * gs
            fac_g.append(g * safe_rsqrt(st.vf[k] + F32(1e-9)))
            row_feat.append(st.vf[k])
            col_feat.append(st.vf[k])
            fac_mom.append(st.m[k] * _rsqrt(st.vf[k] + F32(fac_mom_eps)))  # (vf + eps)^-0.5
            continue
        d0, d1 = st.axes
        st.vr[k] = b * st.vr[k] + (F32(1.0) - b) * np.mean(gs, axis=d0)  # vr: shape without d0
        st.vc[k] = b * st.vc[k] + (F32(1.0) - b) * np.mean(gs, axis=d1)  # vc: shape without d1
        d1_in_vr = d1 - 1 if d1 > d0 else d1  # where the d1 axis sits in vr (d0 removed)
        row_mean = np.mean(st.vr[k], axis=d1_in_vr, keepdims=True)
        row_factor = np.expand_dims(safe_rsqrt(st.vr[k] / (row_mean + F32(1e-9))), d0)  # bcast over d0
        col_factor = np.expand_dims(safe_rsqrt(st.vc[k]), d1)  # broadcast over d1
        fac_g.append(g * row_factor * col_factor)
        row_feat.append(np.broadcast_to(np.expand_dims(st.vr[k], d0), st.shape))
        col_feat.append(np.broadcast_to(np.expand_dims(st.vc[k], d1), st.shape))
        fac_mom.append(st.m[k] * row_factor * col_factor)
    return {"m": list(st.m), "v": [st.v], "rsq": [rsq], "fac_g": fac_g, "row_feat": row_feat,
            "col_feat": col_feat, "fac_mom": fac_mom}


def _linear(x: Array, w: Array, b: Array) -> Array:
    return x @ w.T + b  # torch Linear layout (out, in)


def _as_f32(weights: dict[str, Array], shapes: dict[str, tuple[int, ...]]) -> dict[str, Array]:
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise KeyError(f"missing weights: {missing}")  # doc: a missing key is an error
    out = {k: np.asarray(weights[k], dtype=F32) for k in shapes}
    for k, s in shapes.items():
        if out[k].shape != s:
            raise ValueError(f"{k}: shape {out[k].shape}, expected {s}")
    return out


def _check_inputs(params: list[Array], grads: list[Array], states: list[TensorState]) -> None:
    if len(params) != len(grads) or len(params) != len(states):
        raise ValueError("params, grads and the optimizer state must have the same length")
    for p, g, st in zip(params, grads, states):
        if np.shape(p) != st.shape or np.shape(g) != st.shape:
            raise ValueError(f"shape mismatch: {np.shape(p)}, {np.shape(g)} vs state {st.shape}")


# ---------------------------------------------------------------------------------------------
# small_fc_lopt (AdafacLO)
# ---------------------------------------------------------------------------------------------
SMALL_FC_MOM = np.array([0.54202735, 0.95844138, 0.99802357], F32)
SMALL_FC_RMS = F32(0.99888599)
SMALL_FC_FAC = np.array([0.35621816, 0.99662590, 0.99946129], F32)
SMALL_FC_TIMESCALES = np.array([1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5], F32)
SMALL_FC_SHAPES = {
    "network.input.weight": (32, 39), "network.input.bias": (32,),
    "network.linear_0.weight": (32, 32), "network.linear_0.bias": (32,),
    "network.output.weight": (2, 32), "network.output.bias": (2,),
}


class SmallFcLoptOracle:
    decays = (SMALL_FC_MOM, SMALL_FC_RMS, SMALL_FC_FAC)   # momentum, rms, adafactor

    def __init__(self, weights: dict[str, Array], lr: float = 1.0, weight_decay: float = 0.0):
        self.w = _as_f32(weights, SMALL_FC_SHAPES)
        self.lr, self.weight_decay = lr, weight_decay
        self.t = 0  # doc: the step counter starts at 0
        self.states: list[TensorState] | None = None

    def features(self, p: Array, g: Array, st: TensorState) -> Array:
        """The 39 MLP inputs (last axis); updates st."""
        a = accumulate(st, g, *self.decays, fac_mom_eps=1e-6)
        chans = [g, p, *a["m"], *a["v"], *[m * a["rsq"][0] for m in a["m"]], *a["rsq"], *a["fac_g"],
                 *a["row_feat"], *a["col_feat"], *[_rsqrt(r + F32(1e-8)) for r in a["row_feat"]],
                 *[_rsqrt(c + F32(1e-8)) for c in a["col_feat"]], *a["fac_mom"]]
        assert len(chans) == 28
        x = np.stack([normalize(c) for c in chans], axis=-1)  # doc: channels 0-27 normalized
        time = np.tanh(F32(self.t) / SMALL_FC_TIMESCALES - F32(1.0))  # doc: 28-38, not normalized
        return np.concatenate([x, np.broadcast_to(time, st.shape + (11,))], axis=-1)

    def step(self, params: list[Array], grads: list[Array]) -> list[Array]:
        params = [np.asarray(p, F32) for p in params]
        grads = [np.asarray(g, F32) for g in grads]
        if self.states is None:
            self.states = [TensorState(p.shape, factored_axes(p.shape, velo_tie_rule=False)) for p in params]
        _check_inputs(params, grads, self.states)
        w, out = self.w, []
        for p, g, st in zip(params, grads, self.states):
            x = self.features(p, g, st)
            h = relu(_linear(x, w["network.input.weight"], w["network.input.bias"]))  # 39 -> 32
            h = relu(_linear(h, w["network.linear_0.weight"], w["network.linear_0.bias"]))  # 32 -> 32
            y = _linear(h, w["network.output.weight"], w["network.output.bias"])  # 32 -> 2
            out.append(np.asarray(self.new_param(p, y[..., 0], y[..., 1]), F32))
        self.t += 1
        return out

    def new_param(self, p: Array, direction: Array, magnitude: Array) -> Array:
        step = direction * np.exp(magnitude * F32(0.001)) * F32(0.01)
        new_p = p - F32(self.lr) * step
        if self.weight_decay > 0:  # doc: on the updated p
            new_p = new_p - F32(self.lr * self.weight_decay) * new_p
        return new_p


# ---------------------------------------------------------------------------------------------
# VeLO
# ---------------------------------------------------------------------------------------------
VELO_MOM = np.array([0.9, 0.99, 0.999], F32)
VELO_RMS = F32(0.999)
VELO_FAC = np.array([0.9, 0.99, 0.999], F32)
VELO_FRACTIONS = np.array([0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1], F32)
VELO_MLP_SHAPES = {
    "input_weights_": (256, 4, 30), "input_bias_": (256, 4), "hidden_weights_.0": (256, 4, 4),
    "hidden_bias_.0": (256, 4), "output_weights_": (256, 3, 4), "output_bias_": (256, 3),
}
VELO_RNN_SHAPES = {
    "mix_layer1.weight": (512, 30), "mix_layer1.bias": (512,),
    "mix_layer2.weight": (512, 30), "mix_layer2.bias": (512,),
    "final_mix_layer.weight": (512, 30), "final_mix_layer.bias": (512,),
    "lstm.linear.weight": (2048, 1024), "lstm.linear.bias": (2048,),
    "rnn_to_controls.weight": (256, 512), "rnn_to_controls.bias": (256,),
    "step_size.weight": (1, 512), "step_size.bias": (1,),
    "lstm_init_state.0": (1, 512), "lstm_init_state.1": (1, 512),
}


class LossBuffer:
    """doc: 10 decays exp(-1/h), h = logspace(1, log10(num_steps), 10)."""

    def __init__(self, num_steps: int):
        h = np.logspace(1.0, np.log10(num_steps), 10).astype(F32)
        self.decays = np.exp(F32(-1.0) / h).astype(F32)
        self.means = np.zeros(10, F32)
        self.iteration = 0
        self.running_min = np.full(10, 999999999999.0, F32)

    def update(self, loss: float) -> None:
        d, L = self.decays, F32(loss)
        cor = self.means / (F32(1.0) - d ** (self.iteration + 1))
        approx_max = L if self.iteration == 0 else np.max(cor)
        L = np.minimum(F32(2.0) * np.abs(approx_max), L)
        self.means = self.means * d + L * (F32(1.0) - d)
        self.running_min = np.minimum(self.running_min, self.means / (F32(1.0) - d ** (self.iteration + 1)))
        self.iteration += 1

    def features(self) -> Array:
        if self.iteration <= 2:  # doc: all zero while iteration <= 2
            return np.zeros(9, F32)
        cor = self.means / (F32(1.0) - self.decays ** self.iteration)
        den = np.maximum(F32(1e-8), cor[1:] - self.running_min[:-1])
        return np.clip((cor[:-1] - self.running_min[:-1]) / den - F32(1.0), -1.0, 1.0).astype(F32)


def _cla(x: Array) -> Array:
    # doc: cla(x) = 0.5 * clip(log(1e-8 + |10 x|), -5, 5)
    return F32(0.5) * np.clip(np.log(F32(1e-8) + np.abs(F32(10.0) * x)), -5.0, 5.0)


def velo_tensor_features(p: Array, m: list[Array], v: Array, fraction: float, loss_feats: Array) -> Array:
    """The 30 LSTM inputs of one tensor, from p and the accumulators *before* this step's update."""
    nm = _rsqrt(np.maximum(np.mean(p * p), F32(1e-9)))  # doc: nm = rsqrt(max(mean(p^2), 1e-9))
    m = [mk * nm for mk in m]
    v = v * nm  # doc: p, m, v multiplied by nm
    frac = np.tanh(F32(10.0) * (F32(fraction) - VELO_FRACTIONS))  # fraction_left (9)
    mean_rms = np.atleast_1d(_cla(np.mean(v)))  # (1)
    rank = np.zeros(5, F32)  # doc: one-hot of the number of axes with size > 1
    rank[sum(1 for n in np.shape(p) if n > 1)] = 1.0
    var_m = np.array([_cla(np.mean((mk - np.mean(mk)) ** 2)) for mk in m], F32)  # (3)
    var_rms = np.array([_cla(np.mean((v - np.mean(mk)) ** 2)) for mk in m], F32)  # (3), momentum mean
    out = np.concatenate([frac, loss_feats, mean_rms, rank, var_m, var_rms]).astype(F32)
    assert out.shape == (30,)
    return out


class VeLOOracle:
    def __init__(self, mlp_weights: dict[str, Array], rnn_weights: dict[str, Array], num_steps: int,
                 lr: float = 1.0, weight_decay: float = 0.0):
        self.mlp = _as_f32(mlp_weights, VELO_MLP_SHAPES)  # live copies without the trailing _ ignored
        self.rnn = _as_f32(rnn_weights, VELO_RNN_SHAPES)
        self.num_steps, self.lr, self.weight_decay = num_steps, lr, weight_decay
        self.t = 0
        self.loss_buffer = LossBuffer(num_steps)
        self.states: list[TensorState] | None = None
        self.h: Array | None = None  # (T, 512) per-tensor LSTM state, persists across steps
        self.c: Array | None = None

    def controls(self, x: Array) -> tuple[Array, Array]:
        """Network over the T tensors, x: (T, 30) -> controls (T, 256), lr_mult (T,)."""
        r = self.rnn
        mixed = (_linear(x, r["final_mix_layer.weight"], r["final_mix_layer.bias"])
                 + np.max(relu(_linear(x, r["mix_layer2.weight"], r["mix_layer2.bias"])), axis=0))
        gates = _linear(np.concatenate([mixed, self.h], axis=-1), r["lstm.linear.weight"], r["lstm.linear.bias"])
        i, g, f, o = np.split(gates, 4, axis=-1)  # doc: split i, g, f, o
        self.c = sigmoid(f + F32(1.0)) * self.c + sigmoid(i) * np.tanh(g)
        self.h = sigmoid(o) * np.tanh(self.c)
        controls = _linear(self.h, r["rnn_to_controls.weight"], r["rnn_to_controls.bias"])
        lr_mult = _linear(self.h, r["step_size.weight"], r["step_size.bias"])[:, 0]  # no exp
        return controls, lr_mult

    def tensor_mlp(self, control: Array) -> list[Array]:
        """doc: W = 100 * mean over k of controls_k * bank_k, for each of the 6 MLP tensors."""
        names = ["input_weights_", "input_bias_", "hidden_weights_.0", "hidden_bias_.0",
                 "output_weights_", "output_bias_"]
        out = []
        for n in names:
            bank = self.mlp[n]
            ck = control.reshape((256,) + (1,) * (bank.ndim - 1))
            out.append(F32(100.0) * np.mean(ck * bank, axis=0))
        return out

    def step(self, params: list[Array], grads: list[Array], loss: float) -> list[Array]:
        params = [np.asarray(p, F32) for p in params]
        grads = [np.clip(np.asarray(g, F32), -1000.0, 1000.0) for g in grads]  # doc: before anything
        if self.states is None:
            self.states = [TensorState(p.shape, factored_axes(p.shape, velo_tie_rule=True)) for p in params]
            self.h = np.repeat(self.rnn["lstm_init_state.0"], len(params), axis=0)
            self.c = np.repeat(self.rnn["lstm_init_state.1"], len(params), axis=0)
        _check_inputs(params, grads, self.states)
        self.loss_buffer.update(loss)
        loss_feats = self.loss_buffer.features()  # doc: features after the buffer update
        fraction = self.t / self.num_steps  # doc: f = t / num_steps
        x = np.stack([velo_tensor_features(p, st.m, st.v, fraction, loss_feats)
                      for p, st in zip(params, self.states)])
        controls, lr_mult = self.controls(x)
        out = []
        for j, (p, g, st) in enumerate(zip(params, grads, self.states)):
            w_in, b_in, w_h, b_h, w_out, b_out = self.tensor_mlp(controls[j])
            a = accumulate(st, g, VELO_MOM, VELO_RMS, VELO_FAC, fac_mom_eps=0.0)  # doc: no eps
            rsq = a["rsq"][0]
            chans = [g, np.clip(g, -0.1, 0.1), p, *a["m"], *a["v"], *[m * rsq for m in a["m"]], rsq,
                     *a["fac_g"], g * rsq, *a["row_feat"], *a["col_feat"],
                     *[_rsqrt(r + F32(1e-8)) for r in a["row_feat"]],
                     *[_rsqrt(c + F32(1e-8)) for c in a["col_feat"]], *a["fac_mom"]]
            assert len(chans) == 30
            xe = np.stack([normalize(c) for c in chans], axis=-1)  # doc: all 30 normalized
            h = relu(_linear(xe, w_in, b_in))  # 30 -> 4
            h = relu(_linear(h, w_h, b_h))  # 4 -> 4
            y = _linear(h, w_out, b_out)  # 4 -> 3 (direction, magnitude, unused)
            direction, magnitude = y[..., 0], y[..., 1]
            param_scale = np.sqrt(np.mean(p * p) + F32(1e-9))  # doc: on p before this step
            step = lr_mult[j] * param_scale * direction * np.exp(magnitude * F32(0.001)) * F32(0.001)
            new_p = p - F32(self.lr) * step
            if self.weight_decay > 0:  # doc: then p <- p - lr * wd * p (a no-op at wd = 0)
                new_p = new_p - F32(self.lr * self.weight_decay) * new_p
            out.append(np.asarray(new_p, F32))
        self.t += 1
        return out


# ---------------------------------------------------------------------------------------------
# CELO2 and ELO-CELO2 (PyLO's CELO2_naive / ELO_CELO2_naive at inference; specs/celo2.yaml
# says where the matrices of a rank >= 3 tensor follow the JAX original instead)
#
# In float64, the exact math: Newton-Schulz amplifies rounding of its input by up to
# a^5 ~ 490 along small singular values, so a float32 transcription is itself off by more
# than 1e-5 on some 3 x 3 matrices. The float32 implementations are checked against this.
# ---------------------------------------------------------------------------------------------
F64 = np.float64
CELO2_FEATURE_DIMS = (1, 1, 1, 3, 1, 3, 1, 3, 1, 3, 3, 3, 3, 3)
CELO2_SHAPES = {**{f"w0.{i}": (d, 8) for i, d in enumerate(CELO2_FEATURE_DIMS)}, "b0": (8,),
                "dense_w.0": (8, 8), "dense_b.0": (8,), "dense_w.1": (8, 3), "dense_b.1": (3,)}


def rms_normalize(x: Array, axes: tuple[int, ...]) -> Array:
    """PyLO's second_moment_normalizer: x * rsqrt(1e-9 + mean(x^2)) over `axes`."""
    return x * _rsqrt(F64(1e-9) + np.mean(x * x, axis=axes, keepdims=True))


def newton_schulz(x: Array, axes: tuple[int, int], coeffs: tuple[float, float, float], iters: int,
                  eps: float) -> Array:
    """PyLO's orthogonalize_via_newton_schulz over the matrices spanned by `axes` (the
    lower axis the rows), one per index of the other axes."""
    lo, hi = sorted(axes)
    m = np.moveaxis(x, (lo, hi), (-2, -1))
    transposed = m.shape[-2] > m.shape[-1]
    if transposed:
        m = np.swapaxes(m, -1, -2)
    m = m / (np.sqrt(np.sum(m * m, axis=(-2, -1), keepdims=True)) + F64(eps))
    a, b, c = (F64(k) for k in coeffs)
    for _ in range(iters):
        gram = m @ np.swapaxes(m, -1, -2)
        m = a * m + (b * gram + c * (gram @ gram)) @ m
    if transposed:
        m = np.swapaxes(m, -1, -2)
    return np.moveaxis(m, (-2, -1), (lo, hi))


class CELO2Oracle:
    """CELO2 (shared_adam=False) and ELO-CELO2 (shared_adam=True) over a list of tensors:
    `embedding` holds the indices of parameters in an is_embedding group, `unorthogonalized`
    those in a group with orthogonalize off."""

    def __init__(self, weights: dict[str, Array], lr: float, weight_decay: float, *, embedding: frozenset[int] = frozenset(),
                 shared_adam: bool = False, adam_lr_mult: float = 1.0, adam_weight_decay: float | None = None,
                 adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8, use_adamw_for_1d: bool = True,
                 orthogonalize: bool = True, clip_grad: bool = False, clip_norm: float = 1.0, exp_mult: float = 0.0,
                 rmsmult: float = 1.0, param_scale_mult: bool = False, grad_clip_val: float = 1000.0,
                 ns_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315), ns_iters: int = 5,
                 ns_eps: float = 1e-8, unorthogonalized: frozenset[int] = frozenset()):
        self.w = _as_f32(weights, CELO2_SHAPES)
        self.lr, self.weight_decay, self.embedding = F64(lr), F64(weight_decay), embedding
        self.shared_adam, self.adam_lr = shared_adam, F64(adam_lr_mult * lr)
        self.adam_wd = F64(weight_decay if adam_weight_decay is None else adam_weight_decay)
        # ELO-CELO2's AdamW reads momentum[0] and rms[-1]: betas (0.9, 0.95), eps 1e-8
        self.betas = (0.9, 0.95) if shared_adam else adam_betas
        self.adam_eps = F64(1e-8 if shared_adam else adam_eps)
        self.use_adamw_for_1d, self.orthogonalize = use_adamw_for_1d, orthogonalize
        self.clip_grad, self.clip_norm, self.grad_clip_val = clip_grad, F64(clip_norm), F64(grad_clip_val)
        self.exp_mult, self.rmsmult, self.param_scale_mult = F64(exp_mult), F64(rmsmult), param_scale_mult
        self.ns, self.unorthogonalized = (ns_coeffs, ns_iters, ns_eps), unorthogonalized
        self.b_mom = np.array([0.9, 0.99, 0.999], F64)
        self.b_rms = F64(0.95)
        self.b_fac = np.array([0.9, 0.99, 0.999], F64)
        self.states: dict[int, dict[str, Array]] = {}

    def mlp(self, inputs: list[Array]) -> Array:
        """CELO2MLP: a split first layer (x_i @ w0_i summed), relu, then dense (in, out) layers."""
        w = self.w
        o = sum(x @ w[f"w0.{i}"] for i, x in enumerate(inputs)) + w["b0"]
        o = relu(o)
        o = relu(o @ w["dense_w.0"] + w["dense_b.0"])
        return o @ w["dense_w.1"] + w["dense_b.1"]

    def adam(self, i: int, p: Array, g: Array) -> Array:
        st = self.states.setdefault(i, {"m": np.zeros_like(p), "v": np.zeros_like(p), "t": 0})
        st["t"] += 1
        b1, b2 = (F64(b) for b in self.betas)
        st["m"] = b1 * st["m"] + (F64(1) - b1) * g
        st["v"] = b2 * st["v"] + (F64(1) - b2) * g * g
        m_hat = st["m"] / (F64(1) - b1 ** F64(st["t"]))
        v_hat = st["v"] / (F64(1) - b2 ** F64(st["t"]))
        return p - self.adam_lr * (m_hat / (np.sqrt(v_hat) + self.adam_eps) + self.adam_wd * p)

    def celo2(self, i: int, p: Array, g: Array) -> Array:
        axes = factored_axes(p.shape, velo_tie_rule=False)
        shape = p.shape
        gc = g[..., None]
        st = self.states.get(i)
        if st is None:
            st = self.states[i] = {"mom": np.zeros(shape + (3,), F64), "rms": np.zeros(shape + (1,), F64)}
            if axes is None:
                st["v"] = np.zeros(shape + (3,), F64)
            else:
                st["row"] = np.zeros_like(np.mean(st["mom"], axis=axes[0], keepdims=True))
                st["col"] = np.zeros_like(np.mean(st["mom"], axis=axes[1], keepdims=True))
        st["mom"] = self.b_mom * st["mom"] + (F64(1) - self.b_mom) * gc
        st["rms"] = self.b_rms * st["rms"] + (F64(1) - self.b_rms) * gc * gc
        grad_sqr = gc * gc + F64(1e-30)   # broadcast to the 3 Adafactor channels
        if axes is None:
            st["v"] = self.b_fac * st["v"] + (F64(1) - self.b_fac) * grad_sqr
            fac_g = gc * safe_rsqrt(st["v"] + F64(1e-9))
        else:
            d0, d1 = axes
            st["row"] = self.b_fac * st["row"] + (F64(1) - self.b_fac) * np.mean(grad_sqr, axis=d0, keepdims=True)
            st["col"] = self.b_fac * st["col"] + (F64(1) - self.b_fac) * np.mean(grad_sqr, axis=d1, keepdims=True)
            row_factor = safe_rsqrt(st["row"] / (np.mean(st["row"], axis=d1, keepdims=True) + F64(1e-9)))
            factor = row_factor * safe_rsqrt(st["col"])
            fac_g = gc * factor
        mom, rms = st["mom"], st["rms"]
        rsq = _rsqrt(rms + F64(1e-8))
        inputs = [gc, np.clip(gc, F64(-0.1), F64(0.1)), p[..., None], mom, rms, mom * rsq, rsq, fac_g, gc * rsq]
        if axes is not None:
            full = shape + (3,)
            row, col = np.broadcast_to(st["row"], full), np.broadcast_to(st["col"], full)
            inputs += [row, col, _rsqrt(row + F64(1e-8)), _rsqrt(col + F64(1e-8)), mom * factor]
        # the matrices: the factored axes; a vector or scalar: the whole tensor
        matrix_axes = tuple(axes) if axes is not None else tuple(range(len(shape)))
        out = self.mlp([rms_normalize(x, matrix_axes) for x in inputs])
        step = out[..., 0] * np.exp(out[..., 1] * self.exp_mult)
        if self.param_scale_mult:
            step = step * np.sqrt(np.mean(p * p) + F64(1e-9))
        if self.orthogonalize and i not in self.unorthogonalized and axes is not None:
            step = newton_schulz(step, axes, *self.ns)
        step = rms_normalize(step, matrix_axes) * self.rmsmult
        return p - self.lr * (step + self.weight_decay * p)

    def step(self, params: list[Array], grads: list[Array]) -> list[Array]:
        grads = [np.asarray(g, F64) for g in grads]
        if self.clip_grad:   # optax.clip_by_global_norm over every tensor
            norm = np.sqrt(sum(np.sum(g * g) for g in grads), dtype=F64)
            grads = [g * (self.clip_norm / max(norm, self.clip_norm)) for g in grads]
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            p, g = np.asarray(p, F64), np.clip(g, -self.grad_clip_val, self.grad_clip_val)
            to_adam = self.use_adamw_for_1d and (p.ndim <= 1 or i in self.embedding)
            out.append(self.adam(i, p, g) if to_adam else self.celo2(i, p, g))
        return out
