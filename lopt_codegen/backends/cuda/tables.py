"""Host side of one pass launch: the per-tensor table the generated drivers read, the
small-value buffers, the per-tensor folded MLP weights, and finishing reductions.

Everything here is torch on the tensors' device with sizes known on the host: no
device-to-host copy, so a step never waits for the GPU; and the buffers and the table
are kept across steps, so a steady-state step copies nothing from the host either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...ir.nodes import Node, level_shape
from ..base import TensorTask, checked_accumulator
from ..group_values import GroupMember
from .passes import PassLayout
from .printer import mlp_weight_count

HEAD = ["n", "A", "X", "B", "Y", "C", "d0_is_x", "param_dtype", "grad_dtype", "block0", "blocks",
        "param", "grad", "small", "weights", "partial", "line"]   # = enum Field in runtime.cuh.j2
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
THREADS = 256            # = kThreads
WARPS = THREADS // 32    # = kWarps
LINE_ROWS = 32           # = kLineRows: a line tile is LINE_ROWS rows by 32 columns
CUDA_MAX_BLOCKS = 1024   # per tensor; grid-stride loops cover the rest
HOST_CHUNK = 1 << 14     # elements per host "block" (one partial sum each)


def five_d(shape: tuple[int, ...], axes: tuple[int, int] | None) -> tuple[list[int], int]:
    """[A, X, B, Y, C] of the tensor and whether d0 is X (see DESIGN: canonical index space)."""
    n = math.prod(shape)
    if axes is None:
        return [n, 1, 1, 1, 1], 1
    a, b = sorted(axes)
    dims = [math.prod(shape[:a]), shape[a], math.prod(shape[a + 1:b]), shape[b], math.prod(shape[b + 1:])]
    return dims, int(axes[0] < axes[1])


@dataclass(frozen=True)
class LineTiles:
    """How a pass with row/col means cuts a factored tensor (= LineTiles in runtime.cuh.j2):
    per (a, b), a matrix of X rows by Y*C columns in tiles of LINE_ROWS x 32, each writing
    per-column sums over its rows and per-(row, c) sums over its columns."""

    dims: tuple[int, int, int, int, int]

    @property
    def x_segments(self) -> int:
        return -(-self.dims[1] // LINE_ROWS)

    @property
    def column_strips(self) -> int:
        return -(-(self.dims[3] * self.dims[4]) // 32)

    @property
    def tiles(self) -> int:
        A, _, B, _, _ = self.dims
        return A * B * self.x_segments * self.column_strips

    @property
    def x_sums(self) -> int:
        """Entries of the sums over X (per x segment, the no-X layout)."""
        A, X, B, Y, C = self.dims
        return self.x_segments * A * B * Y * C

    @property
    def y_sums(self) -> int:
        A, X, B, Y, C = self.dims
        return self.column_strips * A * X * B * C

    def means(self, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The means over X and over Y (flat, no-X and no-Y layouts) of one channel's
        partial sums, the segments summed in order."""
        A, X, B, Y, C = self.dims   # (an empty tensor has no segments or strips: means are NaN, as torch's)
        over_x = sums[:self.x_sums].view(self.x_segments, A * B * Y * C).sum(dim=0) / X
        over_y = sums[self.x_sums:self.x_sums + self.y_sums].view(self.column_strips, A * X * B * C).sum(dim=0) / Y
        return over_x, over_y


def blocks_for(n: int, kernel: bool, tiles: LineTiles | None = None) -> int:
    """A tensor's blocks in a launch (the kernel's, else the host loop's): one partial
    sum each. Passes with row/col means share out whole line tiles (a warp's each in
    the kernel, 16 per host block)."""
    if tiles is not None:
        per_block = WARPS if kernel else HOST_CHUNK // (LINE_ROWS * 32)
        work = -(-tiles.tiles // per_block)
    else:
        work = -(-n // THREADS) if kernel else -(-n // HOST_CHUNK)
    return max(1, min(work, CUDA_MAX_BLOCKS) if kernel else work)


def fold_mlp(L: PassLayout, weights: list[torch.Tensor], small: GroupMember, out: torch.Tensor) -> None:
    """Into `out`: [W0 (out, element inputs), b0, W1, b1, ...] with tensor-level inputs
    folded into b0 and tensor-level scales of `x * s` inputs folded into W0's columns."""
    w0, b0 = weights[0], weights[1]
    columns, bias = [], b0
    for part in L.mlp_parts:
        a, b = part.columns
        if part.kind == "bias":
            bias = bias + w0[:, a:b] @ small.get(part.node).reshape(-1)
        elif part.kind == "scaled":
            columns.append(w0[:, a:b] * small.get(part.scale).reshape(1, -1))
        else:
            columns.append(w0[:, a:b])
    flat = [torch.cat(columns, dim=1).reshape(-1), bias.reshape(-1)] + [w.reshape(-1) for w in weights[2:]]
    torch.cat([f.to(torch.float32) for f in flat], out=out)


@dataclass
class Launch:
    """One pass over a group of tensors, kept from step to step: each tensor's buffers
    (small values, folded MLP weights, row/col partial sums, a gradient copy where one is
    needed) and the block partials are refilled in place, and the table is copied to
    the device only when a row changed (a tensor's memory moved). A steady-state step
    then copies nothing from the host, which a CUDA graph capture needs."""

    layout: PassLayout
    kernel: bool                                            # blocks cut for the kernel, else the host loop
    shapes: list[tuple] = field(default_factory=list)       # what the buffers were made for
    rows: list[list[int]] = field(default_factory=list)
    small: list[torch.Tensor] = field(default_factory=list)
    weights: list[torch.Tensor | None] = field(default_factory=list)
    grads: list[torch.Tensor | None] = field(default_factory=list)   # copies of unusable gradients
    lines: list[torch.Tensor | None] = field(default_factory=list)   # row/col partial sums
    partial: torch.Tensor | None = None
    table: torch.Tensor | None = None
    total_blocks: int = 0


def _grad_for_kernel(grad: torch.Tensor) -> tuple[tuple, torch.dtype] | None:
    """(shape, dtype) of the copy a gradient needs (an unsupported dtype or strided), or None."""
    if grad.dtype in DTYPES and grad.is_contiguous():
        return None
    return tuple(grad.shape), grad.dtype if grad.dtype in DTYPES else torch.float32


def _small_shapes(L: PassLayout, task: TensorTask) -> list[tuple[Node, list[int]]]:
    """The pass's small values, each once, with their [channels, *level shape] for a tensor."""
    nodes = list({id(s.node): s.node for s in L.small_slots}.values())
    return [(node, [node.channels, *level_shape(task.param.shape, node.level, task.axes)]) for node in nodes]


def _line_tiles(L: PassLayout, task: TensorTask) -> LineTiles | None:
    if not L.line_reductions:
        return None
    return LineTiles(tuple(five_d(tuple(task.param.shape), task.axes)[0]))


def _allocate(launch: Launch, tasks: list[TensorTask]) -> None:
    L, device = launch.layout, tasks[0].param.device
    n_red = sum(n.channels for n in L.tensor_reductions)
    n_line = sum(n.channels for n in L.line_reductions)
    launch.small, launch.weights, launch.grads, launch.lines, launch.total_blocks = [], [], [], [], 0
    for task in tasks:
        n = task.param.numel()
        size = sum(math.prod(shape) for _, shape in _small_shapes(L, task))
        launch.small.append(torch.zeros(max(1, size), dtype=torch.float32, device=device))
        launch.weights.append(None if L.mlp is None else torch.empty(
            mlp_weight_count((L.mlp_inputs, *L.mlp.attrs[0][1:])), dtype=torch.float32, device=device))
        copy = _grad_for_kernel(task.grad)
        launch.grads.append(None if copy is None else torch.empty(copy[0], dtype=copy[1], device=device))
        tiles = _line_tiles(L, task)
        # Zeros: with C > 32 some partial sums are written by no tile (runtime.cuh.j2).
        launch.lines.append(None if tiles is None else torch.zeros(
            n_line, tiles.x_sums + tiles.y_sums, dtype=torch.float32, device=device))
        launch.total_blocks += blocks_for(n, launch.kernel, tiles)
    launch.partial = torch.empty(max(1, launch.total_blocks * n_red), dtype=torch.float32, device=device)
    launch.table = None


def _buffer_shapes(tasks: list[TensorTask]) -> list[tuple]:
    return [(tuple(t.param.shape), t.axes, t.param.device, _grad_for_kernel(t.grad)) for t in tasks]


def update_launch(launch: Launch, tasks: list[TensorTask], smalls: list[GroupMember],
                  weights: list[list[torch.Tensor] | None]) -> torch.Tensor:
    """Refills the launch's buffers for this step and returns its table on the tensors'
    device (the kept one unless a row changed)."""
    L = launch.layout
    device = tasks[0].param.device
    shapes = _buffer_shapes(tasks)
    if shapes != launch.shapes:
        _allocate(launch, tasks)
        launch.shapes = shapes
    rows, block0 = [], 0
    for k, (task, small, w) in enumerate(zip(tasks, smalls, weights)):
        p = task.param.detach()
        if not p.is_contiguous():
            raise ValueError(f"cuda backend: parameters must be contiguous (updated in place); got one of shape "
                             f"{tuple(p.shape)} with strides {p.stride()}")
        grad = task.grad.detach()
        if launch.grads[k] is not None:
            launch.grads[k].copy_(grad)
            grad = launch.grads[k]
        n = p.numel()
        dims, d0_is_x = five_d(tuple(p.shape), task.axes)
        blocks = blocks_for(n, launch.kernel, _line_tiles(L, task))
        # Small inputs: each node's values for its level, channel-major, one buffer.
        offsets, base, pieces = {}, 0, []
        for node, shape in _small_shapes(L, task):
            pieces.append(torch.broadcast_to(small.get(node), shape).reshape(-1).to(torch.float32))
            offsets[id(node)] = (base, math.prod(shape[1:]))
            base += math.prod(shape)
        if pieces:
            torch.cat(pieces, out=launch.small[k][:base])
        slot_offsets = [offsets[id(s.node)][0] + s.channel * offsets[id(s.node)][1] for s in L.small_slots]
        if L.mlp is not None:
            fold_mlp(L, w, small, launch.weights[k])
        line = launch.lines[k]
        accs = [checked_accumulator(task, name, "cuda") for name in L.accs]
        rows.append([n, *dims, d0_is_x, DTYPES[p.dtype], DTYPES[grad.dtype], block0, blocks,
                     p.data_ptr(), grad.data_ptr(), launch.small[k].data_ptr(),
                     launch.weights[k].data_ptr() if launch.weights[k] is not None else 0,
                     launch.partial.data_ptr(), line.data_ptr() if line is not None else 0,
                     *(a.data_ptr() for a in accs), *(a.stride(0) for a in accs), *slot_offsets])
        block0 += blocks
    if rows != launch.rows or launch.table is None:
        launch.rows, launch.table = rows, table_tensor(rows, device)
    return launch.table


def table_tensor(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def finish_reductions(launch: Launch, tasks: list[TensorTask], smalls: list[GroupMember]) -> None:
    """Fixed-order sums of the block partials (tensor means) and of the line tiles'
    partial sums (row/col means) into each tensor's small values."""
    L = launch.layout
    n_red = sum(n.channels for n in L.tensor_reductions)
    partial = launch.partial[:launch.total_blocks * n_red].view(launch.total_blocks, n_red) if n_red else None
    for row, sums, task, small in zip(launch.rows, launch.lines, tasks, smalls):
        n, block0, blocks = row[0], row[HEAD.index("block0")], row[HEAD.index("blocks")]
        ndim = task.param.dim()
        means = partial[block0:block0 + blocks].sum(dim=0) / n if n_red else None
        start = 0
        for arg in L.tensor_reductions:
            value = means[start:start + arg.channels].reshape(arg.channels, *[1] * ndim)
            for r in L.reduce_nodes:
                if r.op == "mean" and r.args[0] is arg:
                    small.finish(r, value)
            start += arg.channels
        if not L.line_reductions:
            continue
        tiles, d0_is_x = _line_tiles(L, task), task.axes[0] < task.axes[1]
        start = 0
        for arg in L.line_reductions:
            over_x, over_y = zip(*(tiles.means(sums[start + c]) for c in range(arg.channels)))
            for r in L.reduce_nodes:
                if r.op in ("mean_d0", "mean_d1") and r.args[0] is arg:
                    axis = task.axes[0 if r.op == "mean_d0" else 1]
                    over_d0 = r.op == "mean_d0"
                    values = over_x if over_d0 == d0_is_x else over_y
                    shape = [arg.channels, *task.param.shape]
                    shape[1 + axis] = 1
                    small.finish(r, torch.stack(values).view(shape))
            start += arg.channels
