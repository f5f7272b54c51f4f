"""VeLO's per-tensor LSTM hypernetwork and its loss buffer (shared/ALGORITHMS.md)."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .base import LossBufferKind, NetworkKind

HIDDEN = 512
BANKS = 256


def _linear(x: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])


class VeloLstm(NetworkKind):
    name = "velo_lstm"
    input_channels = 30
    outputs = {"lr_mult": 1}
    mlp_sizes = (30, 4, 4, 3)
    state_keys = ("lstm_h", "lstm_c")
    roles = {
        "controller": {
            "mix_layer1.weight": (HIDDEN, 30), "mix_layer1.bias": (HIDDEN,),
            "mix_layer2.weight": (HIDDEN, 30), "mix_layer2.bias": (HIDDEN,),
            "final_mix_layer.weight": (HIDDEN, 30), "final_mix_layer.bias": (HIDDEN,),
            "lstm.linear.weight": (4 * HIDDEN, 2 * HIDDEN), "lstm.linear.bias": (4 * HIDDEN,),
            "rnn_to_controls.weight": (BANKS, HIDDEN), "rnn_to_controls.bias": (BANKS,),
            "step_size.weight": (1, HIDDEN), "step_size.bias": (1,),
            "lstm_init_state.0": (1, HIDDEN), "lstm_init_state.1": (1, HIDDEN),
        },
        "banks": {
            "input_weights_": (BANKS, 4, 30), "input_bias_": (BANKS, 4),
            "hidden_weights_.0": (BANKS, 4, 4), "hidden_bias_.0": (BANKS, 4),
            "output_weights_": (BANKS, 3, 4), "output_bias_": (BANKS, 3),
        },
    }
    _BANK_ORDER = ("input_weights_", "input_bias_", "hidden_weights_.0", "hidden_bias_.0",
                   "output_weights_", "output_bias_")

    def initial_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        rnn = self.weights["controller"]
        return {"lstm_h": rnn["lstm_init_state.0"][0].to(device).clone(),
                "lstm_c": rnn["lstm_init_state.1"][0].to(device).clone()}

    def forward(self, x, state):
        rnn = self.weights["controller"]
        # mix_layer1 ships with the weights but the original network never reads it.
        mixed = _linear(x, rnn, "final_mix_layer") + torch.relu(_linear(x, rnn, "mix_layer2")).amax(0, keepdim=True)
        gates = _linear(torch.cat([mixed, state["lstm_h"]], dim=1), rnn, "lstm.linear")
        i, g, f, o = gates.split(HIDDEN, dim=1)
        c = torch.sigmoid(f + 1.0) * state["lstm_c"] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        controls = _linear(h, rnn, "rnn_to_controls")
        lr_mult = _linear(h, rnn, "step_size")
        banks = self.weights["banks"]
        # Each tensor's MLP weights: 100 * mean over the banks weighted by its controls.
        mlp = [torch.tensordot(controls, banks[k], dims=([1], [0])) * (100.0 / BANKS) for k in self._BANK_ORDER]
        return {"lr_mult": lr_mult}, mlp, {"lstm_h": h, "lstm_c": c}


@lru_cache(maxsize=64)
def _loss_decays(count: int, horizon: float, device: torch.device) -> torch.Tensor:
    """The loss buffer's decays on a device, made once (a steady-state step copies
    nothing from the host; a CUDA graph cannot capture that). Never written in place."""
    horizons = torch.logspace(1.0, math.log10(horizon), count, dtype=torch.float64)
    return torch.exp(-1.0 / horizons).to(device=device, dtype=torch.float32)


class VeloLossBuffer(LossBufferKind):
    name = "velo"
    channels = 9
    _N = 10

    def _decays(self, device: torch.device) -> torch.Tensor:
        return _loss_decays(self._N, self.horizon, device)

    def initial_state(self, device):
        return {"loss_means": torch.zeros(self._N, device=device),
                "loss_iteration": torch.zeros((), device=device),
                "loss_running_min": torch.full((self._N,), 999999999999.0, device=device)}

    def update(self, state, loss):
        decay = self._decays(loss.device)
        it = state["loss_iteration"]
        means = state["loss_means"]
        debias = 1.0 - decay ** (it + 1.0)
        approx_max = torch.where(it == 0, loss, (means / debias).max())
        loss = torch.minimum(2.0 * approx_max.abs(), loss)
        means = means * decay + loss * (1.0 - decay)
        running_min = torch.minimum(state["loss_running_min"], means / debias)
        return {"loss_means": means, "loss_iteration": it + 1.0, "loss_running_min": running_min}

    def features(self, state):
        decay = self._decays(state["loss_means"].device)
        it = state["loss_iteration"]
        cor = state["loss_means"] / (1.0 - decay ** it)
        low = state["loss_running_min"][:-1]
        rel = (cor[:-1] - low) / torch.clamp(cor[1:] - low, min=1e-8) - 1.0
        # No host sync: the "too early" rule is a select, not a Python branch.
        return torch.where(it <= 2, torch.zeros_like(rel), rel.clamp(-1.0, 1.0))
