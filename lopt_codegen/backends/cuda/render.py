"""Render a Program's passes into one CUDA C++ source (templates/cuda/kernels.cu.j2).

The same text builds twice: as C++ for the host (plain loops) and with nvcc for GPUs
(kernels); `#ifdef __CUDACC__` separates the two drivers, the math is shared.
"""
from __future__ import annotations

from dataclasses import dataclass

from ... import __version__
from ...ir.nodes import Level
from ...ir.plan import plan_program
from ...ir.program import Program
from .passes import PassLayout, Slot, layout_plan
from .printer import mlp_weight_count, print_element_function

_INDEX = {Level.STEP: "", Level.TENSOR: "", Level.ROW: " + ix.row", Level.COL: " + ix.col", Level.BATCH: " + ix.batch"}


@dataclass
class Rendered:
    source: str
    layouts: dict[str, list[PassLayout]]   # variant -> the layout of each pass


def describe(slot: Slot) -> str:
    if slot.kind in ("grad", "param"):
        return slot.kind
    node = slot.node
    named = node.attrs and isinstance(node.attrs[0], str)
    label = slot.name if slot.kind == "acc" else f"{node.op} {node.attrs[0]}" if named else node.op
    what = "new " if slot.kind == "acc" and node.op != "state" else ""
    return f"{what}{label}[{slot.channel}]" + ("" if slot.kind == "acc" else f" ({node.level.label})")


def _acc(L: PassLayout, name: str) -> str:
    return f"t[kHead + {L.accs.index(name)}]"


def _channel(L: PassLayout, name: str, channel: int) -> str:
    """Offset of an accumulator's channel: channels are padded (runtime: 64-byte aligned),
    so the stride comes from the table."""
    return "" if channel == 0 else f"{channel} * t[kHead + {len(L.accs) + L.accs.index(name)}] + "


def _loads(L: PassLayout) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(C++ expression, what it is) per input slot, and per value that is the same for
    every element of a tensor (step and tensor level): those are read once per thread
    into `tv` before the element loop, where the compiler could not hoist them (the
    element stores might alias them)."""
    loads, hoisted, smalls = [], [], 0
    for slot in L.inputs:
        if slot.kind in ("grad", "param"):
            field = "kGrad" if slot.kind == "grad" else "kParam"
            loads.append((f"load(as_ptr<const void>(t[{field}]), t[{field}Dtype], i)", slot.kind))
        elif slot.kind == "acc":
            loads.append((f"as_ptr<const float>({_acc(L, slot.name)})[{_channel(L, slot.name, slot.channel)}i]",
                          describe(slot)))
        else:
            column = f"t[kHead + {2 * len(L.accs) + smalls}]"
            if slot.node.level in (Level.STEP, Level.TENSOR):
                loads.append((f"tv[{len(hoisted)}]", describe(slot)))
                hoisted.append((f"as_ptr<const float>(t[kSmall])[{column}]", describe(slot)))
            else:
                loads.append((f"as_ptr<const float>(t[kSmall])[{column}{_INDEX[slot.node.level]}]", describe(slot)))
            smalls += 1
    return loads, hoisted


def _stores(L: PassLayout) -> list[str]:
    stores, k = [], 0
    for name, node in L.acc_writes:
        for c in range(node.channels):
            stores.append(f"as_ptr<float>({_acc(L, name)})[{_channel(L, name, c)}i] = out[{k}]")
            k += 1
    j = 0
    for node in L.tensor_reductions:
        for _ in range(node.channels):
            stores.append(f"red[{j}] += out[{k}]")
            j, k = j + 1, k + 1
    j = 0
    for node in L.line_reductions:
        for _ in range(node.channels):
            stores.append(f"line[{j}] = out[{k}]")
            j, k = j + 1, k + 1
    if L.writes_param:
        stores.append(f"store(as_ptr<void>(t[kParam]), t[kParamDtype], i, out[{k}])")
    return stores


def _summary(L: PassLayout) -> str:
    parts = [f"reads {', '.join(L.accs) or 'no accumulators'}"]
    if L.acc_writes:
        parts.append(f"writes {', '.join(n for n, _ in L.acc_writes)}")
    if L.tensor_reductions:
        parts.append(f"tensor means of {sum(n.channels for n in L.tensor_reductions)} channels")
    if L.line_reductions:
        parts.append(f"row/col mean arguments of {sum(n.channels for n in L.line_reductions)} channels")
    if L.mlp is not None:
        parts.append(f"MLP on {L.fold.features} element inputs")
    if L.writes_param:
        parts.append("writes p")
    return "; ".join(parts)


def pass_context(L: PassLayout) -> dict:
    body, outputs = print_element_function(L)
    n_weights = mlp_weight_count((L.fold.features, *L.mlp.attrs[0][1:])) if L.mlp is not None else 0
    loads, hoisted = _loads(L)
    return {
        "name": L.name, "summary": _summary(L), "body": body, "outputs": outputs,
        "inputs": L.inputs, "loads": loads, "hoisted": hoisted, "stores": _stores(L), "needs_index": L.needs_index,
        "n_accs": len(L.accs), "n_smalls": len(L.small_slots), "n_weights": n_weights,
        "n_tensor_red": sum(n.channels for n in L.tensor_reductions),
        "n_line": sum(n.channels for n in L.line_reductions),
        "input_doc": ", ".join(describe(s) for s in L.inputs),
        "output_doc": ", ".join(what for what, _ in outputs),
    }


def render_cuda(program: Program, spec_path: str) -> Rendered:
    from ...emit import _env  # the one Jinja environment of the project

    plans = plan_program(program)
    layouts = {v: layout_plan(v, program.variants[v], plan) for v, plan in plans.items()}
    passes = [pass_context(L) for ls in layouts.values() for L in ls]
    source = _env().get_template("cuda/kernels.cu.j2").render(
        program=program, version=__version__, spec_path=spec_path, passes=passes)
    return Rendered(source, layouts)


def render_cuda_files(program: Program, spec_path: str) -> dict[str, str]:
    """What `lopt-compile` adds to generated/<name>/ for the cuda backend: the kernel source
    (element functions, kernels, host loops, TVM-FFI wrappers) and its Python binding."""
    from ...emit import _env

    rendered = render_cuda(program, spec_path)
    passes = {v: [L.name for L in ls] for v, ls in rendered.layouts.items()}
    binding = _env().get_template("cuda/binding.py.j2").render(
        program=program, version=__version__, spec_path=spec_path, passes=passes)
    return {f"{program.name}.cu": rendered.source, "cuda_binding.py": binding}
