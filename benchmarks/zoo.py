"""The zoo table of the README: every built-in optimizer on one small transformer-and-conv
shaped set of parameters, its step time as a ratio to torch's fused AdamW measured in
the same run (interleaved), and the optimizer state it keeps per parameter.

The set (2.16M parameters, 25 tensors): a 2048 x 256 embedding (an is_embedding param
group: CELO2's AdamW route), two blocks of attention (256 x 768, 256 x 256) and MLP
(1024 x 256, 256 x 1024) weights with their biases and norm gains, and two 3 x 3 conv
kernels (64 x 32 and 64 x 64 channels). Random meta-weights (the work does not depend
on their values), fixed random gradients, backend="auto".

    python benchmarks/zoo.py              # prints the markdown table
    python benchmarks/zoo.py --steps 5    # fewer timed steps
"""
from __future__ import annotations

import argparse
import os
import sys

# Steady steps are timed: each kernel is built when first needed, not in the background.
os.environ.setdefault("LOPT_BACKGROUND_BUILDS", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.step_time import clone_params, make_tensors, step_fn, time_interleaved  # noqa: E402

LR = 1e-4

# name -> (class, paper, the rule each kind of parameter takes, its network over all tensors,
# extra constructor arguments)
ZOO = {
    "adam": ("Adam", "Kingma & Ba 2015 (torch.optim.Adam)", "one rule", "-", {}),
    "small_fc_lopt": ("SmallFcLopt", "Metz et al. 2022 (AdafacLO)", "one rule", "-", {}),
    "mulo": ("MuLO", "Therien et al. 2024 (μLO)", "one rule, lr / width_mult for hidden matrices", "-", {}),
    "elo": ("ELO", "PyLO's ELO", "one rule", "global grad norm (clipping)", {}),
    "velo": ("VeLO", "Metz et al. 2022 (VeLO)", "one rule", "LSTM: each tensor's MLP weights",
             {"num_steps": 10_000}),
    "celo2": ("CELO2", "arXiv 2602.19142 (CELO2)", "matrices: MLP, Newton-Schulz; 1-D, embeddings: AdamW",
              "global grad norm (clipping)", {}),
    "elo_celo2": ("ELO_CELO2", "arXiv 2602.19142 (ELO-CELO2)", "as CELO2; AdamW on CELO2's accumulators",
                  "global grad norm (clipping)", {}),
}


def shapes() -> tuple[list[tuple[int, ...]], int]:
    """The parameter shapes, and how many come first as the embedding group."""
    out = [(2048, 256)]
    for _ in range(2):
        out += [(256,), (256,), (768, 256), (768,), (256, 256), (256,), (256,), (256,),
                (1024, 256), (1024,), (256, 1024)]
    out += [(64, 32, 3, 3), (64, 64, 3, 3)]
    return out, 1


def groups_of(params: list, embedding: int) -> list[dict]:
    return [{"params": params[:embedding], "is_embedding": True}, {"params": params[embedding:]}]


def make(name: str, params: list, embedding: int):
    cls, extra = make_class(name), ZOO[name][4]
    groups = groups_of(params, embedding) if "is_embedding" in cls.program.hyperparameters else params
    weights = {} if not cls.program.weight_groups else {"weights": "random"}
    return cls(groups, lr=LR, **weights, **extra)


def state_bytes_per_param(opt, params: list) -> float:
    """Every tensor the optimizer keeps (per-parameter state, the network's state, the
    loss buffer), scratch buffers of tensor functions aside, per parameter element."""
    total = 0
    for state in opt.state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total / sum(p.numel() for p in params)


def mlp_sizes(name: str) -> str:
    program = make_class(name).program
    if program.mlp is None:
        return "-"
    return " -> ".join(str(s) for s in program.mlp.sizes) + (" (analytic)" if program.builtin_weights else "")


def newton_schulz_ms(all_shapes: list[tuple[int, ...]], embedding: int, steps: int) -> float:
    """CELO2's 5 Newton-Schulz iterations on its 2-D matrices (not the embedding; the conv
    kernels' small per-tap matrices aside) with plain torch matmuls."""
    import statistics
    import time

    mats = [torch.randn(s) for s in all_shapes[embedding:] if len(s) == 2]
    mats = [m.T if m.shape[0] > m.shape[1] else m for m in mats]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        for x in mats:
            x = x / (x.norm() + 1e-8)
            for _ in range(5):
                a = x @ x.T
                x = 3.4445 * x + (-4.775 * a + 2.0315 * a @ a) @ x
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_class(name: str):
    cls_name = ZOO[name][0]
    return getattr(__import__(f"generated.{name}", fromlist=[cls_name]), cls_name)


def median_adamw_ms(rows: list) -> float:
    import statistics

    return statistics.median(r[-1] for r in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    all_shapes, embedding = shapes()
    base, grads = make_tensors(all_shapes, seed=1, device="cpu")
    rows = []
    for name in ZOO:
        ours_params, adamw_params = clone_params(base, grads), clone_params(base, grads)
        opt = make(name, ours_params, embedding)
        adamw = torch.optim.AdamW(adamw_params, lr=LR, fused=True)
        medians, errors = time_interleaved({"ours": step_fn(opt), "adamw": adamw.step}, args.warmup, args.steps, "cpu")
        if errors:
            raise RuntimeError(f"{name}: {errors}")
        rows.append((name, *ZOO[name][1:4], mlp_sizes(name), state_bytes_per_param(opt, ours_params),
                     medians["ours"] * 1e3, medians["adamw"] * 1e3))
    n = sum(torch.Size(s).numel() for s in all_shapes)
    print(f"{len(all_shapes)} tensors, {n / 1e6:.2f}M parameters, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| optimizer | paper | parameter kinds | network over all tensors | MLP (features -> ... -> outputs) "
          "| state B/param | step ms | x fused AdamW |")
    print("|---|---|---|---|---|---|---|---|")
    for name, paper, kinds, network, mlp, state, ms, adamw_ms in rows:
        print(f"| {name} | {paper} | {kinds} | {network} | {mlp} | {state:.1f} | {ms:.2f} | {ms / adamw_ms:.1f} |")
    print(f"\nfused AdamW: {median_adamw_ms(rows):.2f} ms per step (median over the runs above); CELO2's "
          f"Newton-Schulz alone, as plain torch matmuls on its 2-D matrices: {newton_schulz_ms(all_shapes, embedding, args.steps):.1f} ms")


if __name__ == "__main__":
    main()
