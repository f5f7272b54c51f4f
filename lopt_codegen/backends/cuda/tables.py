"""Host side of one pass launch: the per-tensor table the generated drivers read, the
small-value buffers, the folded MLP weights, and finishing reductions.

Everything here is torch on the tensors' device with sizes known on the host: no
device-to-host copy, so a step never waits for the GPU; the buffers and the table are
kept across steps, so a steady-state step copies nothing from the host either; and
the torch work is batched per group of same-shape tensors (a row of each group buffer
per tensor), so its cost grows with the number of shapes, not of tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...ir.nodes import Node
from ..base import TensorTask, checked_accumulator
from ..group_values import GroupValues
from .passes import PassLayout
from .printer import mlp_weight_count

HEAD = ["n", "A", "X", "B", "Y", "C", "d0_is_x", "param_dtype", "grad_dtype", "block0", "blocks",
        "param", "grad", "small", "weights", "partial", "line"]   # = enum Field in runtime.cuh.j2
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
THREADS = 256            # = kThreads
WARPS = THREADS // 32    # = kWarps
LINE_ROWS = 32           # = kLineRows: a line tile is LINE_ROWS rows by up to 32 columns
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
    per (a, b), a matrix of X rows by Y*C columns in tiles of LINE_ROWS rows by `width`
    columns, each writing per-column sums over its rows and per-(row, c) sums over its
    columns."""

    dims: tuple[int, int, int, int, int]

    @property
    def width(self) -> int:
        """32, or the power of two that holds a narrower Y*C."""
        columns = self.dims[3] * self.dims[4]
        return min(32, 1 << max(0, columns - 1).bit_length())

    @property
    def x_segments(self) -> int:
        return -(-self.dims[1] // LINE_ROWS)

    @property
    def column_strips(self) -> int:
        return -(-(self.dims[3] * self.dims[4]) // self.width)

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

    def sums(self, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums over X and over Y ([..., no-X] and [..., no-Y] layouts) of partial
        sums [..., x_sums + y_sums], the segments summed in order."""
        A, X, B, Y, C = self.dims
        over_x = partial[..., :self.x_sums].unflatten(-1, (self.x_segments, A * B * Y * C)).sum(dim=-2)
        over_y = partial[..., self.x_sums:].unflatten(-1, (self.column_strips, A * X * B * C)).sum(dim=-2)
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


@dataclass
class GroupBuffers:
    """One group's buffers in a launch, a row per tensor: small values, folded MLP
    weights, row/col partial sums, and gradient copies where a gradient is unusable."""

    small: torch.Tensor                    # [tensors, small values]
    weights: torch.Tensor | None           # [tensors, folded MLP weights]
    lines: torch.Tensor | None             # [tensors, line channels, partial sums]
    grads: list[torch.Tensor | None]
    block0: int                            # the group's first block in the launch
    blocks: int                            # per tensor


@dataclass
class Launch:
    """One pass over groups of tensors, kept from step to step: the groups' buffers and
    the block partials are refilled in place, and the table is copied to the device only
    when a row changed (a tensor's memory moved). A steady-state step then copies
    nothing from the host, which a CUDA graph capture needs."""

    layout: PassLayout
    kernel: bool                                            # blocks cut for the kernel, else the host loop
    shapes: list[tuple] = field(default_factory=list)       # what the buffers were made for
    rows: list[list[int]] = field(default_factory=list)
    groups: list[GroupBuffers] = field(default_factory=list)
    partial: torch.Tensor | None = None
    table: torch.Tensor | None = None
    total_blocks: int = 0


def _grad_for_kernel(grad: torch.Tensor) -> tuple[tuple, torch.dtype] | None:
    """(shape, dtype) of the copy a gradient needs (an unsupported dtype or strided), or None."""
    if grad.dtype in DTYPES and grad.is_contiguous():
        return None
    return tuple(grad.shape), grad.dtype if grad.dtype in DTYPES else torch.float32


def _small_nodes(L: PassLayout) -> list[Node]:
    """The pass's small values, each once, in slot order."""
    return list({id(s.node): s.node for s in L.small_slots}.values())


def _line_tiles(L: PassLayout, task: TensorTask) -> LineTiles | None:
    if not L.line_reductions:
        return None
    return LineTiles(tuple(five_d(tuple(task.param.shape), task.axes)[0]))


def _allocate(launch: Launch, groups: list[GroupValues]) -> None:
    L, device = launch.layout, groups[0].tasks[0].param.device
    n_red = sum(n.channels for n in L.tensor_reductions)
    n_line = sum(n.channels for n in L.line_reductions)
    n_weights = 0 if L.mlp is None else mlp_weight_count((L.fold.features, *L.mlp.attrs[0][1:]))
    launch.groups, block0 = [], 0
    for group in groups:
        task, count = group.tasks[0], len(group)
        size = sum(node.channels * math.prod(group.level_shape(node.level)) for node in _small_nodes(L))
        tiles = _line_tiles(L, task)
        blocks = blocks_for(task.param.numel(), launch.kernel, tiles)
        copies = [_grad_for_kernel(t.grad) for t in group.tasks]
        launch.groups.append(GroupBuffers(
            small=torch.zeros(count, max(1, size), dtype=torch.float32, device=device),
            weights=None if L.mlp is None else torch.empty(count, n_weights, dtype=torch.float32, device=device),
            # Zeros: with C > 32 some partial sums are written by no tile (runtime.cuh.j2).
            lines=None if tiles is None else torch.zeros(count, n_line, tiles.x_sums + tiles.y_sums,
                                                         dtype=torch.float32, device=device),
            grads=[None if c is None else torch.empty(c[0], dtype=c[1], device=device) for c in copies],
            block0=block0, blocks=blocks))
        block0 += count * blocks
    launch.total_blocks = block0
    launch.partial = torch.empty(max(1, block0 * n_red), dtype=torch.float32, device=device)
    launch.table = None


def _buffer_shapes(groups: list[GroupValues]) -> list[tuple]:
    return [(group.shape, group.axes, len(group), group.tasks[0].param.device,
             tuple(_grad_for_kernel(t.grad) for t in group.tasks)) for group in groups]


def _fill_group(L: PassLayout, group: GroupValues, buffers: GroupBuffers) -> list[int]:
    """Writes the group's small values and folded MLP weights (one torch call per value,
    not per tensor) and returns each small slot's offset in a tensor's row."""
    count, offsets, base, pieces = len(group), {}, 0, []
    for node in _small_nodes(L):
        piece = group.dense(node).reshape(count, -1)   # [tensors, channels * level size], channel-major
        offsets[id(node)] = (base, piece.shape[1] // node.channels)
        pieces.append(piece.to(torch.float32))
        base += piece.shape[1]
    if pieces:
        torch.cat(pieces, dim=1, out=buffers.small)
    if L.mlp is not None:
        torch.cat([w.reshape(count, -1).to(torch.float32) for w in group.fold_mlp(L.fold)], dim=1,
                  out=buffers.weights)
    return [offsets[id(s.node)][0] + s.channel * offsets[id(s.node)][1] for s in L.small_slots]


def update_launch(launch: Launch, groups: list[GroupValues]) -> torch.Tensor:
    """Refills the launch's buffers for this step and returns its table on the tensors'
    device (the kept one unless a row changed). Rows follow the groups' tasks in order."""
    L = launch.layout
    shapes = _buffer_shapes(groups)
    if shapes != launch.shapes:
        _allocate(launch, groups)
        launch.shapes = shapes
    rows = []
    for group, buffers in zip(groups, launch.groups):
        slot_offsets = _fill_group(L, group, buffers)
        dims, d0_is_x = five_d(group.shape, group.axes)
        for k, task in enumerate(group.tasks):
            p = task.param.detach()
            if not p.is_contiguous():
                raise ValueError(f"cuda backend: parameters must be contiguous (updated in place); got one of "
                                 f"shape {tuple(p.shape)} with strides {p.stride()}")
            grad = task.grad.detach()
            if buffers.grads[k] is not None:
                buffers.grads[k].copy_(grad)
                grad = buffers.grads[k]
            accs = [checked_accumulator(task, name, "cuda") for name in L.accs]
            rows.append([p.numel(), *dims, d0_is_x, DTYPES[p.dtype], DTYPES[grad.dtype],
                         buffers.block0 + k * buffers.blocks, buffers.blocks,
                         p.data_ptr(), grad.data_ptr(), buffers.small[k].data_ptr(),
                         buffers.weights[k].data_ptr() if buffers.weights is not None else 0,
                         launch.partial.data_ptr(), buffers.lines[k].data_ptr() if buffers.lines is not None else 0,
                         *(a.data_ptr() for a in accs), *(a.stride(0) for a in accs), *slot_offsets])
    if rows != launch.rows or launch.table is None:
        launch.rows, launch.table = rows, table_tensor(rows, groups[0].tasks[0].param.device)
    return launch.table


def table_tensor(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def finish_reductions(launch: Launch, groups: list[GroupValues]) -> None:
    """Fixed-order sums of the block partials (tensor means) and of the line tiles'
    partial sums (row/col means), for each group at once, into its small values."""
    L = launch.layout
    n_red = sum(n.channels for n in L.tensor_reductions)
    partial = launch.partial[:launch.total_blocks * n_red].view(launch.total_blocks, n_red) if n_red else None
    for group, buffers in zip(groups, launch.groups):
        count, task = len(group), group.tasks[0]
        ndim = task.param.dim()
        if n_red:
            blocks = partial[buffers.block0:buffers.block0 + count * buffers.blocks]
            sums = blocks.view(count, buffers.blocks, n_red).sum(dim=1)
            start = 0
            for arg in L.tensor_reductions:
                value = sums[:, start:start + arg.channels].reshape(count, arg.channels, *[1] * ndim)
                for r in L.reduce_nodes:
                    if r.op == "mean" and r.args[0] is arg:
                        group.finish_sum(r, value)
                start += arg.channels
        if not L.line_reductions:
            continue
        over_x, over_y = _line_tiles(L, task).sums(buffers.lines)
        d0_is_x = task.axes[0] < task.axes[1]
        start = 0
        for arg in L.line_reductions:
            for r in L.reduce_nodes:
                if r.op in ("mean_d0", "mean_d1") and r.args[0] is arg:
                    over_d0 = r.op == "mean_d0"
                    values = over_x if over_d0 == d0_is_x else over_y
                    shape = [count, arg.channels, *task.param.shape]
                    shape[2 + task.axes[0 if over_d0 else 1]] = 1
                    group.finish_sum(r, values[:, start:start + arg.channels].reshape(shape))
            start += arg.channels
