"""Checks of the numpy oracle itself (tests/oracle.py) against values derived by hand from
../shared/ALGORITHMS.md, so that the oracle can be trusted as the reference's reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tests.oracle import (SMALL_FC_FAC, SMALL_FC_MOM, SMALL_FC_RMS, SMALL_FC_SHAPES, VELO_FAC, VELO_MLP_SHAPES,
                          VELO_RNN_SHAPES, LossBuffer, SmallFcLoptOracle, TensorState, VeLOOracle, accumulate,
                          factored_axes, velo_tensor_features)

SHAPES = [(), (1,), (7,), (5, 3), (3, 5), (4, 4), (1, 6), (6, 1), (2, 3, 4), (3, 3, 2, 2), (4, 2, 3, 3)]


# --- factored axes ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape, standard, velo", [
    ((), None, None), ((7,), None, None),
    ((3, 5), (1, 0), (1, 0)), ((5, 3), (0, 1), (0, 1)),
    ((4, 4), (1, 0), (0, 1)),                      # tie: the lower index is d1 / VeLO swaps
    ((1, 6), (1, 0), (1, 0)), ((6, 1), (0, 1), (0, 1)), ((1, 1), (1, 0), (0, 1)),
    ((2, 3, 4), (2, 1), (2, 1)), ((4, 4, 2), (1, 0), (0, 1)),
    ((3, 3, 2, 2), (1, 0), (1, 0)),                # 4-D tie on axes (0, 1): ordinary rule
    ((2, 5, 5, 1), (2, 1), (1, 2)),                # 4-D tie elsewhere: VeLO swaps
    ((4, 2, 3, 3), (0, 3), (0, 3)),                # tie only below the largest: no swap
])
def test_factored_axes(shape, standard, velo):
    assert factored_axes(shape, velo_tie_rule=False) == standard
    assert factored_axes(shape, velo_tie_rule=True) == velo


def test_small_fc_decays_match_their_derivation():
    def decay(init, off):
        return np.clip(1 - (1 - np.asarray(init)) * np.exp(10 * np.asarray(off)), 0, 1)
    np.testing.assert_allclose(SMALL_FC_MOM, decay([0.9, 0.99, 0.999], [0.15216392, 0.14245212, 0.06812963]), rtol=1e-6)
    np.testing.assert_allclose(SMALL_FC_RMS, decay(0.999, 0.01079706), rtol=1e-6)
    np.testing.assert_allclose(SMALL_FC_FAC, decay([0.9, 0.99, 0.999], [0.18621896, -0.10864615, -0.06185547]),
                               rtol=1e-6)


# --- Adafactor accumulators --------------------------------------------------------------------
def _separable_grad(shape, rng):
    """g = signs * a_0 (x) a_1 (x) ...: for such g the factored estimate is exact, so every
    fac_g_k = sign(g) / sqrt(1 - b_k) on step 1 (any wrong axis breaks the uniformity)."""
    mag = np.ones(shape)
    for ax, n in enumerate(shape):
        mag = mag * rng.uniform(0.5, 2.0, n).reshape([n if i == ax else 1 for i in range(len(shape))])
    return (np.where(rng.random(shape) < 0.5, -1.0, 1.0) * mag).astype(np.float32)


@pytest.mark.parametrize("velo", [False, True])
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2])
def test_factored_fac_g_is_exact_for_separable_grads(shape, velo):
    g = _separable_grad(shape, np.random.default_rng(0))
    st = TensorState(shape, factored_axes(shape, velo))
    a = accumulate(st, g, VELO_FAC, np.float32(0.999), VELO_FAC, fac_mom_eps=0.0)
    d0, d1 = st.axes
    assert st.vr[0].shape == tuple(n for i, n in enumerate(shape) if i != d0)
    assert st.vc[0].shape == tuple(n for i, n in enumerate(shape) if i != d1)
    for k, b in enumerate(VELO_FAC):
        np.testing.assert_allclose(a["fac_g"][k], np.sign(g) / math.sqrt(1 - b), rtol=2e-5)
        assert a["row_feat"][k].shape == shape and a["col_feat"][k].shape == shape


def test_velo_tie_rule_is_the_standard_rule_on_the_transpose():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(4, 4)).astype(np.float32)
    sv, ss = TensorState((4, 4), factored_axes((4, 4), True)), TensorState((4, 4), factored_axes((4, 4), False))
    av = accumulate(sv, g, VELO_FAC, np.float32(0.999), VELO_FAC, 0.0)
    as_ = accumulate(ss, g.T.copy(), VELO_FAC, np.float32(0.999), VELO_FAC, 0.0)
    for key in ("fac_g", "row_feat", "col_feat", "fac_mom"):
        np.testing.assert_allclose(av[key][1], as_[key][1].T, rtol=1e-6)
    ss2 = TensorState((4, 4), factored_axes((4, 4), False))
    same_g = accumulate(ss2, g, VELO_FAC, np.float32(0.999), VELO_FAC, 0.0)
    assert not np.allclose(av["row_feat"][1], same_g["row_feat"][1])  # the rules really differ here


# --- small_fc_lopt: a 1-element step in closed form ------------------------------------------
def _probe_small_fc_weights():
    """direction = relu(norm(m_0)) + 0.25 ; magnitude = relu(-tanh(t - 1)) - 3."""
    w = {k: np.zeros(s, np.float32) for k, s in SMALL_FC_SHAPES.items()}
    w["network.input.weight"][0, 2] = 1.0     # channel 2: m_0 (normalized)
    w["network.input.weight"][1, 28] = -1.0   # channel 28: tanh(t / 1 - 1)
    w["network.linear_0.weight"][0, 0] = w["network.linear_0.weight"][1, 1] = 1.0
    w["network.output.weight"][0, 0] = w["network.output.weight"][1, 1] = 1.0
    w["network.output.bias"][:] = [0.25, -3.0]
    return w


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1, 1)])
def test_small_fc_one_element_closed_form(shape):
    lr, wd = 0.5, 0.1
    opt = SmallFcLoptOracle(_probe_small_fc_weights(), lr=lr, weight_decay=wd)
    b0 = float(SMALL_FC_MOM[0])
    p, m = 0.7, 0.0
    cur = np.full(shape, p, np.float32)
    for t, g in enumerate([0.01, -0.02, 0.03]):
        m = b0 * m + (1 - b0) * g  # only m_0 is read; normalized over 1 element
        direction = max(m / math.sqrt(m * m + 1e-5), 0.0) + 0.25
        magnitude = max(-math.tanh(t / 1.0 - 1.0), 0.0) - 3.0
        p = p - lr * direction * math.exp(magnitude * 0.001) * 0.01
        p = p - lr * wd * p  # weight decay on the updated p
        (cur,) = opt.step([cur], [np.full(shape, g, np.float32)])
        assert cur.shape == shape and cur.dtype == np.float32
        np.testing.assert_allclose(cur, p, rtol=1e-6)
    assert opt.t == 3


def _pick_channel_small_fc(channel):
    """direction = relu(x_c) - relu(-x_c) = x_c (the normalized channel), magnitude = 0."""
    w = {k: np.zeros(s, np.float32) for k, s in SMALL_FC_SHAPES.items()}
    w["network.input.weight"][0, channel], w["network.input.weight"][1, channel] = 1.0, -1.0
    w["network.linear_0.weight"][0, 0] = w["network.linear_0.weight"][1, 1] = 1.0
    w["network.output.weight"][0, :2] = [1.0, -1.0]
    return w


def _normalized(x):
    return x / np.sqrt(np.mean(x * x) + 1e-5)


def test_small_fc_unfactored_fac_mom_has_eps():
    g = np.array([1e-3, 3e-3], np.float32)  # g^2 ~ the 1e-6 eps, so the eps shows
    (n,) = SmallFcLoptOracle(_pick_channel_small_fc(25)).step([np.zeros(2, np.float32)], [g])
    b, bf = float(SMALL_FC_MOM[0]), float(SMALL_FC_FAC[0])
    g64 = g.astype(np.float64)
    fac_mom = (1 - b) * g64 / np.sqrt((1 - bf) * (g64 * g64 + 1e-30) + 1e-6)
    np.testing.assert_allclose(n, -0.01 * _normalized(fac_mom), rtol=1e-5)


def test_small_fc_random_weights_all_shapes_float32_and_pure():
    rng = np.random.default_rng(2)
    w = {k: (rng.normal(size=s) * 0.3).astype(np.float32) for k, s in SMALL_FC_SHAPES.items()}
    opt = SmallFcLoptOracle(w, weight_decay=0.01)
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    for _ in range(3):
        grads = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
        before = [p.copy() for p in params]
        new = opt.step(params, grads)
        assert all(np.array_equal(a, b) for a, b in zip(params, before))  # inputs untouched
        assert all(n.dtype == np.float32 and n.shape == s and np.isfinite(n).all() for n, s in zip(new, SHAPES))
        assert all(not np.array_equal(n, p) for n, p in zip(new, params))
        params = new


# --- VeLO ---------------------------------------------------------------------------------------
def test_loss_buffer_rules():
    buf = LossBuffer(1000)
    np.testing.assert_allclose(buf.decays[0], math.exp(-1 / 10), rtol=1e-6)
    np.testing.assert_allclose(buf.decays[-1], math.exp(-1 / 1000), rtol=1e-6)
    buf.update(1.0)
    assert not buf.features().any()
    buf.update(1000.0)  # clipped to 2 * max(bias-corrected means) = 2 / (1 + d_min)
    assert not buf.features().any()  # still zero at iteration 2
    d = buf.decays.astype(np.float64)
    clipped = 2 / (1 + d[0])
    np.testing.assert_allclose(buf.means, d * (1 - d) + (1 - d) * clipped, rtol=1e-5)
    buf2 = LossBuffer(1000)
    for loss in [8.0, 4.0, 2.0, 1.0]:  # strictly falling: running_min == current mean -> -1
        buf2.update(loss)
    np.testing.assert_allclose(buf2.features(), -1.0, atol=1e-5)


def test_velo_tensor_features_first_step():
    p = np.arange(6, dtype=np.float32).reshape(1, 6)
    zeros = np.zeros_like(p)
    x = velo_tensor_features(p, [zeros] * 3, zeros, 0.0, np.zeros(9, np.float32))
    cla0 = 0.5 * max(math.log(1e-8), -5)
    np.testing.assert_allclose(x[:9], np.tanh(-10 * np.array([0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1])),
                               rtol=1e-6)
    np.testing.assert_array_equal(x[9:18], 0)
    np.testing.assert_allclose(x[[18, 24, 25, 26, 27, 28, 29]], cla0)
    np.testing.assert_array_equal(x[19:24], [0, 1, 0, 0, 0])  # one axis of size > 1
    # p, m, v are all scaled by nm = rsqrt(mean(p^2)): the features are scale-free
    y = velo_tensor_features(3 * p, [3 * p] * 3, 3 * p, 0.5, np.zeros(9, np.float32))
    z = velo_tensor_features(p, [p] * 3, p, 0.5, np.zeros(9, np.float32))
    np.testing.assert_allclose(y, z, rtol=1e-6)


def test_velo_tensor_features_by_hand():
    p = np.array([2.0, -2.0], np.float32)  # nm = 1/2, applied to m and v
    m = [np.array(x, np.float32) * 2 for x in ([0.1, 0.3], [0.0, 0.0], [1.0, 1.0])]
    v = np.array([0.2, 0.4], np.float32) * 2
    x = velo_tensor_features(p, m, v, 1.0, np.full(9, 0.5, np.float32))
    np.testing.assert_allclose(x[:9], np.tanh(10 * (1 - np.array([0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.1]))),
                               rtol=1e-6)
    np.testing.assert_array_equal(x[9:18], 0.5)
    cla = lambda z: 0.5 * min(max(math.log(1e-8 + abs(10 * z)), -5), 5)  # noqa: E731
    np.testing.assert_allclose(x[18], cla(0.3), rtol=1e-5)                                    # mean_rms
    np.testing.assert_array_equal(x[19:24], [0, 1, 0, 0, 0])                                   # rank
    np.testing.assert_allclose(x[24:27], [cla(0.01), cla(0.0), cla(0.0)], rtol=1e-4)           # var_m
    np.testing.assert_allclose(x[27:30], [cla(0.02), cla(0.1), cla(0.5)], rtol=1e-4, atol=1e-6)  # var_rms


def _probe_velo(direction=0.3, magnitude=-2.0, lr_mult=0.7, channel=None):
    """Controls = 1 for every bank and all banks equal, so each tensor's MLP is W = 100 * bank."""
    mlp = {k: np.zeros(s, np.float32) for k, s in VELO_MLP_SHAPES.items()}
    rnn = {k: np.zeros(s, np.float32) for k, s in VELO_RNN_SHAPES.items()}
    rnn["rnn_to_controls.bias"][:] = 1.0
    rnn["step_size.bias"][:] = lr_mult
    if channel is not None:  # direction = relu(x_c) - relu(-x_c) = the normalized channel x_c
        mlp["input_weights_"][:, 0, channel], mlp["input_weights_"][:, 1, channel] = 0.01, -0.01
        mlp["hidden_weights_.0"][:, 0, 0] = mlp["hidden_weights_.0"][:, 1, 1] = 0.01
        mlp["output_weights_"][:, 0, 0], mlp["output_weights_"][:, 0, 1] = 0.01, -0.01
    else:
        mlp["output_bias_"][:, 0] = direction / 100
    mlp["output_bias_"][:, 1] = magnitude / 100
    return mlp, rnn


def test_velo_constant_mlp_closed_form():
    lr, wd = 0.5, 0.01
    opt = VeLOOracle(*_probe_velo(), num_steps=100, lr=lr, weight_decay=wd)
    rng = np.random.default_rng(3)
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    new = opt.step(params, grads, loss=1.0)
    for p, n in zip(params, new):
        scale = math.sqrt(float(np.mean(p.astype(np.float64) ** 2)) + 1e-9)
        expect = p - lr * 0.7 * scale * 0.3 * math.exp(-2.0 * 0.001) * 0.001
        np.testing.assert_allclose(n, expect * (1 - lr * wd), rtol=1e-6)


@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 2])
def test_velo_fac_g_direction_separable(shape):
    g = _separable_grad(shape, np.random.default_rng(4))
    p = np.ones(shape, np.float32)  # param_scale = 1
    opt = VeLOOracle(*_probe_velo(magnitude=0.0, lr_mult=1.0, channel=11), num_steps=10)
    (n,) = opt.step([p], [g], loss=1.0)
    np.testing.assert_allclose(n, p - np.sign(g) * 0.001, rtol=1e-5)


def test_velo_unfactored_fac_mom_has_no_eps():
    mlp, rnn = _probe_velo(magnitude=0.0, lr_mult=1.0, channel=27)  # channel 27: fac_mom_0
    g = np.array([1e-3, -3e-3], np.float32)
    p = np.array([1.0, 1.0], np.float32)
    (n,) = VeLOOracle(mlp, rnn, num_steps=10).step([p], [g], loss=1.0)
    fac_mom = np.sign(g) * (1 - 0.9) / math.sqrt(1 - 0.9)  # m * vf^-0.5 with no eps: +-sqrt(0.1)
    np.testing.assert_allclose(n, p - 0.001 * _normalized(fac_mom), rtol=1e-5)


def test_velo_lstm_cell_closed_form():
    """Gate order i, g, f, o with sigmoid(f + 1); the input is [x', h]; lr_mult = h_0 (no exp)."""
    mlp, rnn = _probe_velo(direction=1.0, magnitude=0.0)
    rnn["step_size.bias"][:] = 0.0
    rnn["step_size.weight"][0, 0] = 1.0
    rnn["lstm.linear.bias"][[0, 512, 1024, 1536]] = [0.2, 0.3, -0.4, 0.5]  # i, g, f, o of unit 0
    rnn["final_mix_layer.bias"][0], rnn["mix_layer2.bias"][0] = 0.2, 0.1  # x'_0 = 0.2 + relu(0.1)
    rnn["lstm.linear.weight"][512, 0] = 0.5   # g_0 += 0.5 * x'_0
    rnn["lstm.linear.weight"][512, 512] = 1.0  # g_0 += h_0
    rnn["lstm_init_state.0"][0, 0], rnn["lstm_init_state.1"][0, 0] = -0.7, 0.6
    opt = VeLOOracle(mlp, rnn, num_steps=10)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    h, c, p = -0.7, 0.6, np.array([2.0], np.float32)
    for _ in range(2):
        c = sig(-0.4 + 1) * c + sig(0.2) * math.tanh(0.3 + 0.5 * 0.3 + h)
        h = sig(0.5) * math.tanh(c)
        expect = p - h * 2.0 * 1.0 * 0.001  # lr_mult * param_scale * direction * 0.001
        (p,) = opt.step([p], [np.array([0.1], np.float32)], loss=1.0)
        np.testing.assert_allclose(p, expect, rtol=1e-6)


@pytest.mark.parametrize("shape", [(4, 4), (2, 5, 5, 1), (3, 3, 2, 2)])
def test_each_optimizer_uses_its_tie_rule(shape):
    """fac_g and fac_mom are symmetric in the roles of d0 and d1; row_feat is not."""
    g = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    p = np.ones(shape, np.float32)

    def row_feat0(velo, b_f):
        a = accumulate(TensorState(shape, factored_axes(shape, velo)), g, b_f, np.float32(0.9), b_f, 0.0)
        return _normalized(a["row_feat"][0].astype(np.float64))

    (n,) = VeLOOracle(*_probe_velo(magnitude=0.0, lr_mult=1.0, channel=15), num_steps=10).step([p], [g], 1.0)
    np.testing.assert_allclose(n, p - 0.001 * row_feat0(True, VELO_FAC), rtol=1e-5)
    (n,) = SmallFcLoptOracle(_pick_channel_small_fc(13)).step([p], [g])  # channel 13: row_feat_0
    np.testing.assert_allclose(n, p - 0.01 * row_feat0(False, SMALL_FC_FAC), rtol=1e-5)
    if shape != (3, 3, 2, 2):  # the rules differ on this tensor
        assert not np.allclose(row_feat0(True, VELO_FAC), row_feat0(False, VELO_FAC))


def test_velo_grad_clip_before_anything():
    p = np.array([1.0, -2.0, 3.0], np.float32)
    out = []
    for g in ([5e3, -1e4, 0.5], [1e3, -1e3, 0.5]):
        opt = VeLOOracle(*_probe_velo(magnitude=0.0, lr_mult=1.0, channel=0), num_steps=10)  # channel 0: g
        out.append(opt.step([p], [np.array(g, np.float32)], loss=1.0)[0])
    np.testing.assert_array_equal(out[0], out[1])
    scale = math.sqrt((1 + 4 + 9) / 3 + 1e-9)
    np.testing.assert_allclose(out[1], p - scale * 0.001 * _normalized(np.array([1e3, -1e3, 0.5])), rtol=1e-6)


def _random_velo(rng):
    mlp = {k: (rng.normal(size=s) * 0.02).astype(np.float32) for k, s in VELO_MLP_SHAPES.items()}
    rnn = {k: (rng.normal(size=s) * 0.05).astype(np.float32) for k, s in VELO_RNN_SHAPES.items()}
    return mlp, rnn


def test_velo_random_weights_tensors_coupled_and_order_equivariant():
    rng = np.random.default_rng(5)
    mlp, rnn = _random_velo(rng)
    params = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(4)]
    fwd = VeLOOracle(mlp, rnn, num_steps=50, weight_decay=0.1)
    rev = VeLOOracle(mlp, rnn, num_steps=50, weight_decay=0.1)
    pf, pr = params, params[::-1]
    for k in range(4):
        h_before = None if fwd.h is None else fwd.h.copy()
        pf = fwd.step(pf, grads[k], loss=3.0 / (k + 1))
        pr = rev.step(pr, grads[k][::-1], loss=3.0 / (k + 1))
        assert all(n.dtype == np.float32 and np.isfinite(n).all() for n in pf)
        for a, b in zip(pf, pr[::-1]):  # the max over tensors is order-free: results permute
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        if h_before is not None:
            assert not np.allclose(h_before, fwd.h)  # the LSTM state persists and moves
    # LSTM inputs use the accumulators before the update, so this step's gradient of another
    # tensor cannot matter yet; through the max over tensors it matters one step later
    one, two = VeLOOracle(mlp, rnn, num_steps=50), VeLOOracle(mlp, rnn, num_steps=50)
    g2 = [g.copy() for g in grads[0]]
    g2[-1] = g2[-1] * 100
    assert np.array_equal(one.step(params, grads[0], 1.0)[0], two.step(params, g2, 1.0)[0])
    assert not np.array_equal(one.step(params, grads[1], 1.0)[0], two.step(params, grads[1], 1.0)[0])


def test_missing_weight_is_an_error():
    mlp, rnn = _probe_velo()
    del rnn["lstm_init_state.1"]
    with pytest.raises(KeyError):
        VeLOOracle(mlp, rnn, num_steps=10)
    w = _probe_small_fc_weights()
    del w["network.output.bias"]
    with pytest.raises(KeyError):
        SmallFcLoptOracle(w)
