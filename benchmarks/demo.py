"""Train one small model with every generated optimizer and with torch AdamW; print a table.

The task is made in code (nothing is downloaded): 4-class classification of 20-D Gaussian
inputs labelled by a fixed random teacher network, learned by a 20-64-4 MLP (1,604
parameters) with cross-entropy, 200 steps of minibatches of 128 out of 2,048 samples.
Everything is seeded: each optimizer starts from the same initial model and sees the same
batches. The learned optimizers run with weights="random" (untrained, seeded
meta-weights), so they show that the generated code trains, not how well VeLO or
small_fc_lopt train with real meta-weights. Adam is the spec with analytic weights that
reproduce torch.optim.Adam.

    python benchmarks/demo.py [--steps 200]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

IN_DIM, HIDDEN, CLASSES = 20, 64, 4
N_SAMPLES, BATCH = 2048, 128
TASK = (f"{CLASSES}-class classification of {IN_DIM}-D Gaussian inputs labelled by a random teacher MLP; "
        f"model: {IN_DIM}-{HIDDEN}-{CLASSES} MLP (ReLU), cross-entropy, minibatches of {BATCH} "
        f"out of {N_SAMPLES} samples")


def make_task(seed: int = 0):
    """Inputs and labels of the synthetic task (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, IN_DIM, generator=gen)
    w1 = torch.randn(IN_DIM, 32, generator=gen)
    w2 = torch.randn(32, CLASSES, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x, y


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN_DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES))


# With random (untrained) meta-weights no lr makes the learned optimizers train this task:
# a sweep (small_fc_lopt lr 1e-3..1, seeds 0-5; VeLO lr 1e-2..100) moved the loss by < 0.01
# or, for small_fc_lopt at lr >= 0.1, made it worse. VeLO keeps its default (the original
# VeLO's scale); small_fc_lopt gets a small lr at which its random steps do little harm.
SMALL_FC_LR = 0.01
VELO_LR = 1.0
ADAM_LR = 1e-2


def optimizers() -> dict[str, Callable]:
    """name -> make(params, steps)."""
    from generated.adam import Adam
    from generated.small_fc_lopt import SmallFcLopt
    from generated.velo import VeLO
    return {
        "AdamW (torch)": lambda params, steps: torch.optim.AdamW(params, lr=ADAM_LR, weight_decay=0.0),
        "Adam (generated)": lambda params, steps: Adam(params, lr=ADAM_LR),
        "SmallFcLopt (random weights)": lambda params, steps: SmallFcLopt(params, lr=SMALL_FC_LR,
                                                                          weights="random", seed=0),
        "VeLO (random weights)": lambda params, steps: VeLO(params, lr=VELO_LR, num_steps=steps,
                                                           weights="random", seed=0),
    }


def train(make_opt: Callable, steps: int = 200, seed: int = 0) -> dict:
    """Train the task's model for `steps` steps; returns the full-dataset loss before and
    after, the accuracy after, the per-step losses and the per-step `opt.step()` times."""
    x, y = make_task(seed)
    model = make_model(seed)
    opt = make_opt(model.parameters(), steps)
    gen = torch.Generator().manual_seed(seed + 1)
    loss_fn = torch.nn.functional.cross_entropy
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    losses, step_times = [], []
    order = torch.randperm(N_SAMPLES, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + BATCH > N_SAMPLES:
            order, pos = torch.randperm(N_SAMPLES, generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        start = time.perf_counter()
        if isinstance(opt, torch.optim.AdamW):
            opt.step()
        else:
            opt.step(loss=loss.detach())
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(x)
        final = loss_fn(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return {"initial_loss": initial, "final_loss": final, "accuracy": accuracy, "losses": losses,
            "step_times": step_times}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train a small model with every generated optimizer.")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    n_params = sum(p.numel() for p in make_model(args.seed).parameters())
    print(f"Task: {TASK}.")
    print(f"{n_params:,} parameters, {args.steps} steps, seed {args.seed}, {torch.get_num_threads()} torch threads. "
          "Learned optimizers use weights=\"random\" (untrained meta-weights).\n")
    results = {}
    for name, make in optimizers().items():
        results[name] = train(make, args.steps, args.seed)
    base = statistics.median(results["AdamW (torch)"]["step_times"])
    header = f"{'optimizer':<30} {'loss start':>10} {'final loss':>10} {'accuracy':>9} {'step (ms)':>10} {'x AdamW':>8}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        med = statistics.median(r["step_times"])
        print(f"{name:<30} {r['initial_loss']:>10.4f} {r['final_loss']:>10.4f} {r['accuracy']:>8.1%} "
              f"{med * 1e3:>10.3f} {med / base:>7.1f}x")
    print("\nloss: cross-entropy on all samples before / after training; accuracy after; step: median time "
          "of opt.step().\nAdam (generated) should match AdamW (torch) (same lr, no weight decay). The learned "
          "optimizers run\nuntrained random meta-weights: they show the generated code runs, not how well "
          "trained VeLO /\nsmall_fc_lopt train (pass weights=<path> for that).")


if __name__ == "__main__":
    main()
