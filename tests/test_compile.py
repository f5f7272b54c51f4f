"""`opt.step()` inside a torch.compile'd training step: it runs eagerly (one graph break
for the whole step, whatever the backend and the number of tensors) and its results are
those of an eager run."""
from __future__ import annotations

import pytest
import torch

from generated.adam import Adam
from generated.small_fc_lopt import SmallFcLopt
from generated.velo import VeLO

BACKENDS = ["reference", "tvm", "cuda"]
OPTIMIZERS = {"adam": (Adam, {}), "small_fc_lopt": (SmallFcLopt, {"weights": "random"}),
              "velo": (VeLO, {"weights": "random", "num_steps": 20})}


def model_and_data() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, torch.randn(16, 6), torch.randn(16, 3)


def train(name: str, backend: str, compiled: bool, steps: int = 3, with_step: bool = True
          ) -> tuple[list[torch.Tensor], int]:
    """The parameters after `steps` training steps, and the graph breaks dynamo counted
    (with_step=False: the same training step without opt.step(), for its own breaks)."""
    import torch._dynamo

    cls, extra = OPTIMIZERS[name]
    model, x, y = model_and_data()
    opt = cls(model.parameters(), lr=1e-2, backend=backend, **extra)

    def train_step() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if with_step:
            opt.step(loss=loss) if opt.program.needs_loss else opt.step()
        return loss

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(train_step, backend="eager") if compiled else train_step
    for _ in range(steps):
        step()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return [p.detach().clone() for p in model.parameters()], breaks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_compiled_train_step_matches_eager_with_one_graph_break(name, backend):
    eager, _ = train(name, backend, compiled=False)
    compiled, breaks = train(name, backend, compiled=True)
    _, without_step = train(name, backend, compiled=True, with_step=False)   # backward() breaks too
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    assert breaks - without_step == 1, f"opt.step() made {breaks - without_step} graph breaks"
