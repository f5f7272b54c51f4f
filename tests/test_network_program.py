"""A spec's network as compiled once into closures (backends/network_program.py): its
folded subexpressions follow the hyperparameters they read, checked on VeLO's loss
buffer against the oracle's (tests/oracle.py) over fresh random losses, one network
object running two horizons in turn."""
from __future__ import annotations

import numpy as np
import torch

from generated.velo import VeLO
from lopt_codegen.backends.network_program import SpecNetwork
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
