"""What one pass kernel reads and writes, derived from the plan without building any
TVM object (so binding a cached module costs no compile-time work)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...ir.mlp_fold import MlpFold
from ...ir.nodes import LEAVES, Level, Node
from ...ir.plan import Pass
from .view import LANES, ROW_CHUNKS, SHORT_ROWS_MACS, View

# Rows from this long sum tensor means along the rows (PassSignature.means_over_y): VeLO's
# 16 such channels then keep 24 KB of column sums, most of L1 beside the streamed values.
MEANS_OVER_Y_FROM = 384


def _chunks(n: int, limit: int = ROW_CHUNKS) -> int:
    """The largest divisor of n that is <= limit: the row chunks of axis-X partial sums
    (a fixed partition, so the reduction order never depends on the thread count)."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass
class PassSignature:
    index: int
    view: View
    param_dtype: str
    grad_dtype: str
    leaves: list[str] = field(default_factory=list)                 # "param", "grad"
    accumulators: list[tuple[str, int]] = field(default_factory=list)  # (name, channel) read
    small: list[Node] = field(default_factory=list)                 # row/col/batch values: a buffer each
    scalars: dict[int, int] = field(default_factory=dict)           # id(node) -> offset in one buffer
    scalar_nodes: list[Node] = field(default_factory=list)
    mlp: Node | None = None
    x_sums: list[tuple[Node, int]] = field(default_factory=list)    # (reduction, channel) from stage P
    y_sums: list[tuple[Node, int]] = field(default_factory=list)    # ... from stage Q
    m_sums: list[tuple[Node, int]] = field(default_factory=list)    # ... tensor means from stage M
    outputs: list[tuple[str, int]] = field(default_factory=list)    # ("param" | accumulator, channel)
    output_nodes: dict[str, Node] = field(default_factory=dict)
    stored: dict[int, str] = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        """Row chunks of the axis-X sums: a tensor that splits its loops across the cores
        splits X (a shape-generic kernel always in ROW_CHUNKS: it is built for X =
        ROW_CHUNKS x R, whatever tensor's dims its view holds); in a group run a tensor per
        core, one chunk (fewer sums to finish)."""
        if not self.view.parallel_within:
            return 1
        return ROW_CHUNKS if self.view.symbolic else _chunks(self.view.dims[1])

    @property
    def lanes(self) -> int:
        """Vector width of the axis-Y partial sums: 1 where Y is strided by C (unless
        folded) or the kernel is scalar along Y; where Y is not whole vectors, the sums
        run over the element stages' padded Y (View.element_y), the padding's lanes
        masked (VeLO's tensor means on 100 x 60 summed a lane at a time: 4.3x the time an
        element of 96 x 96)."""
        view = self.view
        _, _, _, y, c = view.dims
        if view.folded:
            return LANES
        # (not for short rows, padded or not: a tensor's passes lay their sums out alike)
        padded = view.element_y is not None and y >= LANES // 2
        return LANES if view.fixed_y and c == 1 and (y % LANES == 0 or padded) else 1

    @property
    def means_in_m(self) -> bool:
        """Whether tensor means sum in M (stages._m_sums): one vector a channel per row
        chunk, kept in registers along each row, where P keeps every column's sums (17
        channels of VeLO's on a 512x512x3x3 conv: a load and a store each per vector, its
        pass 1.6x slower than on a 512x4608 matrix) and Q every row's (its finish read 13 MB
        a step of VeLO's on GPT-2). CPU kernels whose rows split into ROW_CHUNKS chunks, or
        that run whole per core (else P's rows keep a loop of their own, _rows_in_one_loop)."""
        view = self.view
        return not view.gpu and (not view.parallel_within or self.chunks == ROW_CHUNKS)

    @property
    def means_over_y(self) -> bool:
        """(Where not means_in_m) Whether tensor means sum along the rows (Q), not over X (P): on the CPU, where a
        row is long and Q's sums are vectors, a row's sums stay in registers, where P loads
        and stores every channel's column sums at every row, and these no longer fit in L1
        (VeLO on GPT-2's tensors: 7% faster a step). Not for shorter rows (more partial sums
        to finish than P's: 8% slower on 200 small tensors), folded views (a row's sums are
        then C vectors a channel: too many for the registers) or shape-generic kernels (one
        build serves rows of every length)."""
        view = self.view
        return not view.symbolic and not view.folded and self.lanes == LANES and view.dims[3] >= MEANS_OVER_Y_FROM

    @property
    def scalar_count(self) -> int:
        return sum(n.channels for n in self.scalar_nodes)


def pass_signature(p: Pass, graph_new_param: Node, accumulators: dict[str, Node], view: View,
                   param_dtype: str, grad_dtype: str) -> PassSignature:
    if p.macs >= SHORT_ROWS_MACS and not view.symbolic:
        view = replace(view, pad_short_rows=True)
    sig = PassSignature(p.index, view, param_dtype, grad_dtype, stored=dict(p.stored))
    for name in p.writes:
        node = graph_new_param if name == "param" else accumulators[name]
        sig.output_nodes[name] = node
        sig.outputs += [(name, c) for c in range(node.channels)]
    for r in p.reduce_nodes:
        if r.op == "mean" and sig.means_in_m:
            sig.m_sums.extend((r, c) for c in range(r.channels))
            continue
        over_x = not sig.means_over_y if r.op == "mean" else view.reduced_axis(r.op) == "X"
        (sig.x_sums if over_x else sig.y_sums).extend((r, c) for c in range(r.channels))
    seen: set[int] = set()
    stack = list(reversed(p.roots))
    accs: set[tuple[str, int]] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in p.stored or (node.op == "state" and node.level == Level.ELEMENT):
            name = p.stored.get(id(node)) or node.attrs[0]
            accs.update((name, c) for c in range(node.channels))
        elif node.op == "const":
            continue
        elif node.level < Level.ELEMENT:
            if node.level <= Level.TENSOR:
                sig.scalars[id(node)] = sum(n.channels for n in sig.scalar_nodes)
                sig.scalar_nodes.append(node)
            else:
                sig.small.append(node)
        elif node.op in LEAVES:
            if node.op not in sig.leaves:
                sig.leaves.append(node.op)
        elif node.op == "mlp":
            sig.mlp = node
            stack.extend(feat for feat, _, _, _ in reversed(MlpFold.of(node).element_parts))
        else:
            stack.extend(reversed(node.args))
    sig.leaves.sort()
    sig.accumulators = sorted(accs)
    return sig
