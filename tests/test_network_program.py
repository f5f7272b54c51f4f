"""A spec's network as compiled once into closures (backends/network_program.py): its
folded subexpressions follow the hyperparameters they read (VeLO's loss buffer against
the oracle's, tests/oracle.py, over fresh random losses, one network object running two
horizons in turn); its values in numpy arrays (the CPU's) give torch's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from generated.velo import VeLO
from lopt_codegen.backends import numpy_ops, torch_ops
from lopt_codegen.backends.network_arrays import NumpyArrays
from lopt_codegen.backends.network_fold import FOLD_FROM_ROWS
from lopt_codegen.backends.network_program import NUMPY_ROWS, SpecNetwork
from oracle import LossBuffer


def _steps(buffer: SpecNetwork, losses: list[float], num_steps: float) -> list[dict[str, np.ndarray]]:
    """The buffer's means, running minimum and features after each loss."""
    state = {k: v.reshape(1, -1) for k, v in buffer.initial_state(torch.device("cpu")).items()}
    out = []
    for loss in losses:
        scope = buffer.run({"loss": torch.tensor([[loss]]), **state}, {"num_steps": num_steps})
        state = {k: scope[k].reshape(1, -1) for k in buffer.state_keys}
        out.append({k: scope[k].reshape(-1).numpy() for k in ("loss_means", "loss_running_min", "loss_features")})
    return out


def test_folded_values_follow_the_hyperparameters_they_read():
    program = VeLO([torch.nn.Parameter(torch.randn(3))], weights="random", num_steps=10).program
    make = lambda: SpecNetwork(program.loss_buffer, {}, None, torch.device("cpu"))  # noqa: E731
    reused = make()
    rng = np.random.default_rng(0)
    for horizon in (100, 5000, 100):   # (the decays fold num_steps: made again for each value)
        losses = [float(2.0 / (step + 1) + rng.uniform(0, 0.1)) for step in range(8)]
        got, fresh = _steps(reused, losses, float(horizon)), _steps(make(), losses, float(horizon))
        for step, (a, b) in enumerate(zip(got, fresh)):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k}, num_steps {horizon}, step {step}")
        assert np.abs(got[-1]["loss_features"]).max() > 1e-3   # (past the first steps: not all zero)
    # The values themselves, where the oracle's float32 decays are not too near 1 (at 5000
    # steps, 1 - decay takes a rounding of 2e-4 of itself, the spec's decays being float64's)
    oracle = LossBuffer(100)
    for step, (loss, values) in enumerate(zip(losses, got)):
        oracle.update(loss)
        np.testing.assert_allclose(values["loss_means"], oracle.means, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(values["loss_running_min"], oracle.running_min, rtol=1e-5, err_msg=f"step {step}")
        # (features are clipped to [-1, 1], ratios of differences of the means: 1e-5 of their range)
        np.testing.assert_allclose(values["loss_features"], oracle.features(), rtol=0, atol=1e-5, err_msg=f"step {step}")


def test_numpy_ops_are_torch_ops():
    """Every element-wise op of the IR in numpy (a network's on the CPU) gives torch's
    values, non-finite inputs included, to float32 rounding."""
    assert set(numpy_ops.UNARY) == set(torch_ops.UNARY) and set(numpy_ops.BINARY) == set(torch_ops.BINARY)
    rng = np.random.default_rng(1)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0, 1e30], np.float32)
    a = np.concatenate([rng.standard_normal(200).astype(np.float32) * 3, special, special]).reshape(1, -1)
    b = np.concatenate([rng.standard_normal(200).astype(np.float32) * 3, special, special[::-1]]).reshape(1, -1)
    with np.errstate(all="ignore"):
        for name, f in numpy_ops.UNARY.items():
            want = torch_ops.UNARY[name](torch.from_numpy(a)).numpy()
            got = f(a)
            assert got.dtype == np.float32, name
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-38, equal_nan=True, err_msg=name)
        for name, f in numpy_ops.BINARY.items():
            want = torch_ops.BINARY[name](torch.from_numpy(a), torch.from_numpy(np.abs(b) if name == "pow" else b))
            got = f(a, np.abs(b) if name == "pow" else b)
            assert got.dtype == np.float32, name
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-38, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("rows", [1, 2, FOLD_FROM_ROWS + 1, 37])
def test_a_network_on_numpy_arrays_gives_torch_values(rows):
    """VeLO's network (random weights) over fresh random inputs and state, its values in
    numpy arrays (the CPU's up to NUMPY_ROWS tensors) and in torch tensors (a GPU's, and
    the CPU's beyond): the same outputs, MLP weights and new state."""
    opt = VeLO([torch.nn.Parameter(torch.randn(3))], weights="random", num_steps=10)
    net = opt._network(torch.device("cpu"))
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 30, generator=gen)
    state = {k: torch.randn(rows, c, generator=gen) for k, (_, c) in net.ir.state.items()}
    nets = {kind: SpecNetwork(net.ir, net.weights, opt.program.mlp.sizes, torch.device("cpu"), arrays=kind)
            for kind in ("numpy", "torch")}
    (out_n, mlp_n, state_n), (out_t, mlp_t, state_t) = (nets[k].forward(x, dict(state)) for k in ("numpy", "torch"))
    pairs = [*zip(out_n.values(), out_t.values()), *zip(mlp_n, mlp_t), *zip(state_n.values(), state_t.values())]
    assert len(pairs) == 1 + 6 + 2
    for a, b in pairs:
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert (rows <= NUMPY_ROWS) == isinstance(net._program(rows).arrays, NumpyArrays)


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
def test_products_of_one_value_run_as_one(arrays):
    """VeLO's two linear layers over lstm_h (controls, lr_mult) and its six MLP banks
    projected from controls run as one product each; every value is still its own
    product (controls = W lstm_h + b, each MLP weight controls x its bank x 100/256), also
    after a bias and a bank are written in place (the stacked weights made again)."""
    opt = VeLO([torch.nn.Parameter(torch.randn(3))], weights="random", num_steps=10)
    base = opt._network(torch.device("cpu"))
    weights = {g: {k: v.clone() for k, v in d.items()} for g, d in base.weights.items()}
    net = SpecNetwork(base.ir, weights, opt.program.mlp.sizes, torch.device("cpu"), arrays=arrays)
    banks = ["input_weights_", "input_bias_", "hidden_weights_.0", "hidden_bias_.0", "output_weights_", "output_bias_"]
    assert net._merged == {("linear", ("var", "lstm_h"), "rnn"): ["rnn_to_controls", "step_size"],
                           ("project", ("var", "controls"), "mlp"): banks}
    gen = torch.Generator().manual_seed(3)
    rows = 3
    x = torch.randn(rows, 30, generator=gen)
    state = {k: torch.randn(rows, c, generator=gen) for k, (_, c) in net.ir.state.items()}
    rnn, mlp_banks = weights["rnn"], weights["mlp"]
    for written in (False, True):
        if written:
            rnn["step_size.bias"].add_(0.25)
            mlp_banks["hidden_bias_.0"].mul_(-2.0).add_(0.5)
        values = net.run({"x": x, **state}, names=["lstm_h", "controls", "lr_mult"])
        for name, layer in (("controls", "rnn_to_controls"), ("lr_mult", "step_size")):
            want = values["lstm_h"] @ rnn[f"{layer}.weight"].t() + rnn[f"{layer}.bias"]
            torch.testing.assert_close(values[name], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=name)
        _, mlp, _ = net.forward(x, dict(state))
        for w, key, shape in zip(mlp, banks, net.mlp_shapes):
            want = (values["controls"] @ mlp_banks[key].reshape(256, -1) * (100 / 256)).reshape(rows, *shape)
            torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=key)
