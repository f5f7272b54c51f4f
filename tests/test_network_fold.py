"""A network's linear layer over a concat folded through the layer before
(backends/network_fold.py): the same values as the body as written, on fresh random
inputs and weights, at every row count (as written below FOLD_FROM_ROWS, bit for bit);
folded only where the identity holds and saves multiply-adds; the folded weight made
again when the weights are written in place."""
from __future__ import annotations

import pytest
import torch

from generated.velo import VeLO
from lopt_codegen.backends.network_fold import FOLD_FROM_ROWS, FoldedLinear
from lopt_codegen.backends.network_program import SpecNetwork
from lopt_codegen.ir.network import NetworkIR

X, V, H, OUT = 6, 20, 5, 12   # x's width, v's, the other part's, the layer's outputs


def _weights(gen: torch.Generator, inner_out: int = V) -> dict[str, dict[str, torch.Tensor]]:
    def layer(out: int, inp: int) -> dict[str, torch.Tensor]:
        return {"weight": torch.randn(out, inp, generator=gen) / inp ** 0.5, "bias": torch.randn(out, generator=gen)}
    g = {f"{name}.{part}": t for name, (out, inp) in
         {"f": (inner_out, X), "m": (inner_out, X), "l": (OUT, inner_out + H)}.items()
         for part, t in layer(out, inp).items()}
    return {"g": g}


def _network(r: tuple, weights: dict, reads_v: bool = False, v_first: bool = True) -> tuple[SpecNetwork, SpecNetwork]:
    """v = linear(x, f) + r; y = linear(concat(v, h), l) (or concat(h, v)): (as it runs, as written)."""
    parts = (("var", "v"), ("var", "h")) if v_first else (("var", "h"), ("var", "v"))
    body = (("set", "v", ("op", "add", (("linear", ("var", "x"), "g", "f"), r))),
            ("set", "y", ("linear", ("concat", parts), "g", "l")))
    return _pair(body, weights, {"y": OUT, **({"v": V} if reads_v else {})})


def _pair(body: tuple, weights: dict, outputs: dict[str, int]) -> tuple[SpecNetwork, SpecNetwork]:
    ir = NetworkIR(state={"h": (("const", (0.0,) * H), H)}, body=body, outputs=outputs, mlp=(), groups=("g",))
    folded = SpecNetwork(ir, weights, None, torch.device("cpu"))
    written = SpecNetwork(ir, weights, None, torch.device("cpu"), fold=False)
    return folded, written


SHARED = ("over_tensors", "max", ("op", "relu", (("linear", ("var", "x"), "g", "m"),)))


def _folds(net: SpecNetwork) -> list[FoldedLinear]:
    return [e[1] for _, _, e in net.body if e[0] == "folded_linear"]


def _compare(folded: SpecNetwork, written: SpecNetwork, rows: int, gen: torch.Generator) -> None:
    x, h = torch.randn(rows, X, generator=gen), torch.randn(rows, H, generator=gen)
    a, _, _ = folded.forward(x, {"h": h})
    b, _, _ = written.forward(x, {"h": h})
    for name in b:
        if rows < FOLD_FROM_ROWS:
            assert torch.equal(a[name], b[name]), (name, rows)
        else:   # (one rounding order for another: the products' sums)
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5 * float(b[name].abs().max()))
            assert not torch.equal(a["y"], b["y"]), "the folded layer did not run"


@pytest.mark.parametrize("v_first", [True, False])
@pytest.mark.parametrize("rows", [1, FOLD_FROM_ROWS - 1, FOLD_FROM_ROWS, 37])
def test_folded_layer_gives_the_layer_as_written(rows, v_first):
    gen = torch.Generator().manual_seed(rows)
    folded, written = _network(SHARED, _weights(gen), v_first=v_first)
    assert len(_folds(folded)) == 1 and [name for _, name, _ in folded.body] == ["v:shared", "y"]
    _compare(folded, written, rows, gen)


def test_v_is_still_computed_where_something_else_reads_it():
    gen = torch.Generator().manual_seed(0)
    folded, written = _network(SHARED, _weights(gen), reads_v=True)
    assert len(_folds(folded)) == 1 and [name for _, name, _ in folded.body] == ["v:shared", "v", "y"]
    _compare(folded, written, 30, gen)


@pytest.mark.parametrize("case", ["r per tensor", "x wider than v", "v set twice", "x set in the body"])
def test_no_fold_where_the_identity_or_the_saving_fails(case):
    gen = torch.Generator().manual_seed(1)
    v = ("op", "add", (("linear", ("var", "x"), "g", "f"), SHARED))
    y = ("set", "y", ("linear", ("concat", (("var", "v"), ("var", "h"))), "g", "l"))
    if case == "r per tensor":   # (W r would be a product per tensor: no saving)
        folded, written = _network(("linear", ("var", "x"), "g", "m"), _weights(gen))
    elif case == "x wider than v":
        folded, written = _network(SHARED, _weights(gen, inner_out=X - 1))
    elif case == "v set twice":   # (which v y reads is its place's)
        twice = ("op", "add", (("linear", ("var", "x"), "g", "f"), ("const", (0.5,) * V)))
        folded, written = _pair((("set", "v", v), y, ("set", "v", twice)), _weights(gen), {"y": OUT, "v": V})
    else:   # (x's value at y's place is not v's)
        x = ("set", "x", ("op", "mul", (("var", "x"), ("const", (2.0,)))))
        folded, written = _pair((("set", "v", v), x, y), _weights(gen), {"y": OUT})
    assert _folds(folded) == [] and folded.body == list(written.body)


def test_the_folded_weight_follows_weights_written_in_place():
    gen = torch.Generator().manual_seed(2)
    weights = _weights(gen)
    folded, written = _network(SHARED, weights)
    _compare(folded, written, 16, gen)
    weights["g"]["f.weight"].mul_(1.5)
    weights["g"]["l.weight"][:, :3].mul_(-2.0)
    _compare(folded, written, 16, gen)


def test_velo_folds_its_lstm_gates_through_the_input_mix():
    """VeLO's gates (2048 x 1024 over concat(mixed, lstm_h)) read x (30 channels) in place
    of mixed (512), which nothing else reads."""
    opt = VeLO([torch.nn.Parameter(torch.randn(3, 4))], weights="random", num_steps=10)
    net = opt._network(torch.device("cpu"))
    (fold,) = _folds(net)
    assert (fold.layer, fold.inner) == (("rnn", "lstm.linear"), ("rnn", "final_mix_layer"))
    assert "mixed" not in [name for _, name, _ in net.body]
    assert fold.macs(net.weights) == (2048 * 1024, 2048 * (512 + 30), 2048 * 512)   # (the benchmarks' floors)
