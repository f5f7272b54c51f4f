"""The torch.optim.Optimizer every generated optimizer subclasses.

A generated class only sets `program` (the compiled IR) and spells out the constructor
signature; everything else — state layout, weights, backend dispatch, the loss buffer,
state_dict round trips — lives here once.
"""
from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch

from ..backends import select_backend
from ..backends.base import StepBatch, TensorTask
from ..backends.sharded import has_rows
from ..ir.nodes import level_shape, topo_order
from ..spec.names import PARAMETER_VALUES
from ..ir.program import Program, is_scratch
from ..backends.network_program import SpecNetwork
from .axes import factored_axes
from .routes import Router
from .checkpoint import fold_global_state, local_accumulator, sharded_accumulator, unfold_global_state
from .sharding import TensorSharding, agree, dtensor_grad, dtensor_rows, is_dtensor
from .steady import SteadyTasks, host_key
from .step_counts import StepCounts
from .weights import resolve_weights

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUTE_KEY = "__route"   # in a routed optimizer's per-parameter state (spec names cannot start with __)


_ALIGN_FLOATS = 16   # 64 bytes: compiled kernels take each channel as an aligned buffer
_ROUTES_KEPT = 256   # routes kept across steps (LearnedOptimizer._tasks)


def _aligned_zeros(channels: int, shape: list[int], device: torch.device) -> torch.Tensor:
    """float32 zeros [channels, *shape] whose channels each start on a 64-byte boundary
    (the channel stride is padded), so kernels use them without copies."""
    numel = math.prod(shape)
    padded = -(-numel // _ALIGN_FLOATS) * _ALIGN_FLOATS
    storage = torch.zeros(channels, max(padded, 1), dtype=torch.float32, device=device)
    return storage[:, :numel].view(channels, *shape)


def _channel_aligned(values: torch.Tensor) -> torch.Tensor:
    """A float32 copy of `values` ([channels, *shape]), laid out as _aligned_zeros."""
    out = _aligned_zeros(values.shape[0], list(values.shape[1:]), values.device)
    out.copy_(values)
    return out


@contextmanager
def _gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a step runs. A step of hundreds of tensors
    allocates tens of thousands of short-lived objects; with collection on, the ones that
    happen to be alive at a collection are promoted and soon trigger a full collection
    of the whole process (torch and TVM alone hold ~230k objects): measured 150 ms every
    ~10 steps, 15 ms per step, on a 200-tensor VeLO step. The step makes no reference
    cycles, so refcounting frees its garbage either way."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _parameter_values_used(program: Program) -> list[str]:
    """The per-parameter values (names.PARAMETER_VALUES) the program reads."""
    roots = [n for g in program.variants.values() for n in g.roots()]
    roots += [t for _, t in program.routes if t is not None]
    return sorted({n.attrs[0] for n in topo_order(roots) if n.op == "hyper" and n.attrs[0] in PARAMETER_VALUES})


def _parameter_values(p: torch.Tensor, group: dict, names: list[str]) -> dict[str, float]:
    """μP's values of a parameter: from mup's infshape (mup.set_base_shapes) when it has
    one, else from its param group, else the defaults."""
    infshape = getattr(p, "infshape", None)
    if infshape is not None:
        found = {"width_mult": infshape.width_mult(), "inf_dims": infshape.ninf()}
    else:
        found = {n: group.get(n, PARAMETER_VALUES[n]) for n in names}
    return {n: float(found[n]) for n in names}


def _nonfinite_flag(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(1,) on `device`: 1.0 if any gradient holds a NaN or an inf, else 0.0, with no host
    read (a CUDA graph captures it): a max-norm is finite exactly when its tensor is."""
    grads = [g for g in grads if g.numel()]   # (FSDP2 leaves some ranks no rows of a tensor)
    if not grads:   # a rank of a sharded step without tensors
        return torch.zeros(1, device=device)
    norms = torch._foreach_norm(grads, float("inf"))
    return (~torch.isfinite(torch.stack([n.float().to(device) for n in norms]))).any().float().reshape(1)


def _opaque_to_dynamo(cls: type) -> None:
    """Inside a torch.compile'd function, a step runs eagerly as one opaque call: one graph
    break for the whole step on every backend (dynamo would trace into the kernels'
    bindings). torch.optim wraps `step` with its hooks on the first construction; the
    wrapper itself is made opaque, so its frame is not compiled either."""
    step = cls.step
    if getattr(step, "opaque_to_dynamo", False):
        return
    opaque = torch.compiler.disable(step)
    opaque.hooked = getattr(step, "hooked", False)   # torch.optim's mark: its hooks are inside
    opaque.opaque_to_dynamo = True
    cls.step = opaque


class LearnedOptimizer(torch.optim.Optimizer):
    program: ClassVar[Program]

    def __init__(self, params, *, weights: Any = None, seed: int = 0, backend: str = "auto",
                 shard: bool | ProcessGroup = False, reduce_grads: bool = False, **hyper: float):
        program = self.program
        for name, value in hyper.items():
            if value is None:
                raise TypeError(f"{program.class_name}() needs {name}=...: it has no default")
            # A flag (nesterov=True) is a number too: 1.0 or 0.0 in the expressions.
            if not isinstance(value, (int, float, torch.Tensor)) or isinstance(value, bool) and name in ("lr", "weight_decay"):
                raise TypeError(f"{program.class_name}(): {name} must be a number, got {value!r}")
            if name in ("lr", "weight_decay") and value < 0:
                raise ValueError(f"{program.class_name}(): invalid {name} {value}: must be >= 0")
        self._dtensors = False   # (add_param_group sets it, from the constructor's groups on)
        super().__init__(params, dict(hyper))
        _opaque_to_dynamo(type(self))
        for group in self.param_groups:
            for p in group["params"]:
                self._check_param(p)
        self._weights = resolve_weights(program, weights, seed)
        self.backend = select_backend(program, backend)
        self._router = Router(program)
        self._routes: dict[tuple, tuple] = {}   # (shape, hyperparameter values) -> _route's
        self._parameter_values = _parameter_values_used(program)
        self._skips_nonfinite = any(n.op == "skip_step" for g in program.variants.values() for n in topo_order(g.roots()))
        # Scratch values per graph: never saved, so made again after a load_state_dict.
        self._scratch = {v: [n for n, per in program.state_levels.items() if v in per and is_scratch(n)]
                         for v in program.variants}
        self._networks: dict[torch.device, SpecNetwork] = {}
        self._loss_buffers: dict[torch.device, SpecNetwork] = {}
        self._mlp_cache: dict[torch.device, list[torch.Tensor]] = {}
        if reduce_grads and shard is False:
            raise ValueError(f"{program.class_name}(reduce_grads=True) averages gradients over the ranks of a "
                             "sharded step: pass shard=True (or a process group) too")
        self._sharding = None if shard is False else \
            TensorSharding(None if shard is True else shard, reduce_grads, program.class_name)
        if self._sharding is not None and self._dtensors:
            raise ValueError(f"{program.class_name}(shard=...) shards replicated parameters (DDP); these are "
                             "DTensors, already sharded (FSDP2's fully_shard): leave shard unset")
        self._step_counts = StepCounts(views=self._sharding is None and not self._dtensors)
        self._steady = SteadyTasks()
        if self._dtensors or self._sharding is not None:   # ready for torch.distributed.checkpoint
            self._init_all_state()

    # --- checks ------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, but a parameter listed twice in a group is an error (torch warns and
        would step it twice)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{type(self).__name__}: a parameter appears twice in one param group; list each "
                             "parameter once (model.parameters() does)")
        super().add_param_group({**param_group, "params": params})
        self._dtensors = self._dtensors or any(is_dtensor(p) for p in params)

    def _check_param(self, p: torch.Tensor) -> None:
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{self.program.class_name} supports float32, bfloat16 and float16 parameters "
                            f"(state and math are float32); got a {p.dtype} parameter of shape {tuple(p.shape)}")

    def _grad(self, p: torch.Tensor) -> torch.Tensor:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{self.program.class_name} does not support sparse gradients "
                               f"(parameter of shape {tuple(p.shape)}); use a dense embedding or another optimizer")
        if grad.shape != p.shape:
            raise RuntimeError(f"gradient shape {tuple(grad.shape)} does not match parameter shape {tuple(p.shape)}")
        return grad

    # --- state -------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, variant: str, axes: tuple[int, int] | None) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
        if self.program.routes:
            state[ROUTE_KEY] = variant   # the graph this state belongs to (saved with it)
        for name, per_variant in self.program.state_levels.items():
            if variant in per_variant:
                level, channels = per_variant[variant]
                # (zeros in place: a copy of zeros took a third of the first step's state)
                state[name] = _aligned_zeros(channels, list(level_shape(p.shape, level, axes)), p.device)
        network = self._network(p.device)
        if network is not None:
            state.update(network.initial_state(p.device))
        return state

    def _network(self, device: torch.device) -> SpecNetwork | None:
        """The spec's network with its weights on `device` (moved once, then cached)."""
        program = self.program
        if program.network is None:
            return None
        if device not in self._networks:
            weights = {g: {k: v.to(device) for k, v in self._weights[g].items()} for g in program.network.groups}
            per_tensor_mlp = program.mlp is not None and program.mlp.weight_group is None
            network = SpecNetwork(program.network, weights, program.mlp.sizes if per_tensor_mlp else None, device)
            if self._sharding is not None:
                network.over_tensors = self._sharding.over_tensors
            self._networks[device] = network
        return self._networks[device]

    def _mlp_weights(self, device: torch.device) -> list[torch.Tensor] | None:
        mlp = self.program.mlp
        if mlp is None or mlp.weight_group is None:
            return None
        if device not in self._mlp_cache:
            group = self._weights[mlp.weight_group]
            self._mlp_cache[device] = [group[f"{layer}.{part}"].to(device) for layer in mlp.layers
                                       for part in ("weight", "bias")]
        return self._mlp_cache[device]

    def _loss_buffer(self, device: torch.device) -> SpecNetwork:
        if device not in self._loss_buffers:
            self._loss_buffers[device] = SpecNetwork(self.program.loss_buffer, {}, None, device)
        return self._loss_buffers[device]

    def _loss_features(self, loss: torch.Tensor, group: dict, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The loss buffer's step (one per optimizer: the first group's hyperparameters, such
        as VeLO's horizon num_steps, define it); its state is self.state["loss_buffer"]."""
        device = loss.device
        buffer = self._loss_buffer(device)
        hyper = {k: float(group[k]) for k in self.program.hyperparameters if group.get(k) is not None}
        state = self.state.get("loss_buffer")
        if state is None:   # (not setdefault: that made the initial state again at every step)
            state = self.state["loss_buffer"] = buffer.initial_state(device)
        scope = buffer.run({"loss": loss.reshape(1, 1), **{k: v.reshape(1, -1) for k, v in state.items()}}, hyper,
                           (*buffer.state_keys, "loss_features"))
        for k in buffer.state_keys:   # new tensors, in the shapes kept (a 0-D count from older checkpoints)
            new = scope[k].reshape(state[k].shape)
            state[k] = new if skip is None else torch.where(skip.reshape(()) != 0, state[k], new)
        return scope["loss_features"].reshape(-1)

    # --- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, loss: Any = None):
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with _gc_paused():
            return self._step(loss)

    def _step(self, loss: Any):
        program, sharding = self.program, self._sharding
        if sharding is not None:
            sharding.assign([(p, g) for g in self.param_groups for p in g["params"]], self._state_floats)
            stepped = [p for g in self.param_groups for p in g["params"] if p.grad is not None and p.numel()]
            if sharding.reduce_grads:
                sharding.average_grads(stepped)
        tasks, mesh_group, generation = self._step_tasks()
        if not tasks and sharding is None:
            return loss
        # A rank of a sharded step that owns no tensor still joins its collectives.
        device = tasks[0].param.device if tasks else self.param_groups[0]["params"][0].device
        batch = StepBatch(tasks, mlp_weights=self._mlp_weights(device), network=self._network(device),
                          tensor_functions=program.tensor_functions, generation=generation,
                          hyper_values=self._steady.hyper)
        if self._skips_nonfinite:
            batch.skip_step = _nonfinite_flag([t.grad for t in tasks], device)
        loss_t = None
        if program.needs_loss:
            if loss is None:
                raise ValueError(f"{program.class_name}.step() needs the training loss: call "
                                 "step(loss=loss) or step(closure)")
            loss_t = torch.as_tensor(loss, dtype=torch.float32, device=device).detach().reshape(())
        if sharding is not None or mesh_group is not None:   # the same loss and skip on every rank
            loss_t, batch.skip_step = agree(sharding.group if sharding is not None else mesh_group, loss_t,
                                            batch.skip_step)
        if loss_t is not None:
            batch.loss_features = self._loss_features(loss_t, self.param_groups[0], batch.skip_step)
        if program.network is not None and len({t.param.device for t in tasks}) > 1:
            raise RuntimeError(f"{program.class_name} runs one network over all tensors: put all parameters "
                               "on one device")
        if tasks:
            try:
                self.backend.step(batch)
            finally:
                self._steady.drop_grads()
            if generation is not None and batch.replaced_states:
                self._steady.rekey(host_key(self.param_groups, self.state, self._parameter_values,
                                            self.backend.replays_steps)[0], self.param_groups, self.state)
        elif batch.network is not None:
            self._join_network(batch)
        self._count_step(batch.skip_step, device)
        if sharding is not None:
            sharding.gather_params(stepped)
        return loss

    def _step_tasks(self) -> tuple[list[TensorTask], ProcessGroup | None, int | None]:
        """This step's tasks with their step counts tracked, the process group of FSDP2's
        mesh, and the tasks' generation (steady.py): the last step's tasks where nothing
        but gradients and hyperparameter values changed since. Steps over shards or
        DTensors are not kept (None)."""
        if self._sharding is not None or self._dtensors:
            tasks, mesh_group = self._tasks()
            self._step_counts.track([task.state for task in tasks])
            return tasks, mesh_group, None
        steady, groups, names = self._steady, self.param_groups, self.program.hyperparameters
        hyper = tuple(tuple(float(group[k]) for k in names) for group in groups)
        addresses = self.backend.replays_steps
        key, grads = host_key(groups, self.state, self._parameter_values, addresses)
        # (a route reads the values: each task's found again where its group's changed)
        route = (lambda task, g: self._cached_route(task.param, groups[g], hyper[g])) \
            if self._router.hyper_names or self._parameter_values else None
        if key == steady.key and steady.take(grads, hyper, names, route):
            return steady.tasks, None, steady.generation
        tasks, _ = self._tasks()
        self._step_counts.track([task.state for task in tasks])   # (the backends read them)
        # The key again: the first step made state, and the counts may be new views.
        steady.remember(host_key(groups, self.state, self._parameter_values, addresses)[0], tasks, hyper, groups,
                        self.state)
        return tasks, None, steady.generation

    def _tasks(self) -> tuple[list[TensorTask], ProcessGroup | None]:
        """This step's tensors (under shard=..., this rank's; under FSDP2, this rank's rows of
        each), their state made at their first step; and the process group of FSDP2's mesh."""
        program, sharding = self.program, self._sharding
        tasks: list[TensorTask] = []
        mesh_group = None
        for group in self.param_groups:
            values_now = tuple(float(group[k]) for k in program.hyperparameters)
            for p in group["params"]:
                # An empty tensor has nothing to update, and its means (NaN) would reach the
                # other tensors through cross-tensor network inputs (VeLO's max over tensors).
                if p.grad is None or p.numel() == 0 or sharding is not None and not sharding.owns(p):
                    continue
                self._check_param(p)
                grad = self._grad(p)
                axes, task_hyper, variant = self._cached_route(p, group, values_now)
                values, row_shard = p, None
                if is_dtensor(p):
                    values, row_shard = dtensor_rows(p, program.class_name)
                    grad = dtensor_grad(p, values, program.class_name)
                    mesh_group = mesh_group or p.device_mesh.get_group()
                state = self.state[p]
                if not state:
                    state.update(self._init_state(values, variant, axes))
                elif state.get(ROUTE_KEY, variant) != variant:
                    raise RuntimeError(f"{program.class_name}: a parameter of shape {tuple(p.shape)} now takes "
                                       f"'{variant}', but its state belongs to '{state[ROUTE_KEY]}': its route "
                                       "changed after its first step (a flag in its param group); keep a "
                                       "parameter's route")
                elif self._scratch[variant] and self._scratch[variant][0] not in state:   # after load_state_dict
                    state.update({k: v for k, v in self._init_state(values, variant, axes).items() if is_scratch(k)})
                tasks.append(TensorTask(values, grad, state, task_hyper, variant, axes, row_shard))
        return tasks, mesh_group

    def _cached_route(self, p: torch.Tensor, group: dict, values: tuple[float, ...]
                      ) -> tuple[tuple[int, int] | None, dict[str, float], str]:
        """_route's for the group's hyperparameter `values`, kept: tensors of one shape and
        values take one route, unless per-parameter values (μP) count: found once (2 us a
        shape and step)."""
        key = (p.shape, values)
        route = self._routes.get(key)
        if route is None:
            route = self._route(p, group, dict(zip(self.program.hyperparameters, values)))
            if not self._parameter_values:
                if len(self._routes) >= _ROUTES_KEPT:   # (a schedule: new values every step)
                    self._routes.clear()
                self._routes[key] = route
        return route

    def _route(self, p: torch.Tensor, group: dict, hyper: dict[str, float] | None = None
               ) -> tuple[tuple[int, int] | None, dict[str, float], str]:
        """The tensor's factored axes, its hyperparameters (hyper: its group's, when at hand)
        and the graph it takes."""
        program = self.program
        if hyper is None:
            hyper = {k: float(group[k]) for k in program.hyperparameters}
        axes = factored_axes(tuple(p.shape), program.factored_axes)
        if self._parameter_values:
            hyper = {**hyper, **_parameter_values(p, group, self._parameter_values)}
        return axes, hyper, self._router.variant(tuple(p.shape), axes is not None, hyper)

    def _state_floats(self, p: torch.Tensor, group: dict) -> int:
        """The floats of state the tensor keeps: what a sharded step balances over the ranks."""
        program = self.program
        axes, _, variant = self._route(p, group)
        floats = sum(channels * math.prod(level_shape(p.shape, level, axes))
                     for per in program.state_levels.values() if variant in per for level, channels in [per[variant]])
        return floats + (sum(c for _, c in program.network.state.values()) if program.network is not None else 0)

    def _join_network(self, batch: StepBatch) -> None:
        """The network over no rows: a rank of a sharded step without tensors takes part in
        the network's reductions over tensors."""
        channels = next(g.network_input.channels for g in self.program.variants.values() if g.network_input is not None)
        network = batch.network
        rows = torch.empty(0, channels, dtype=torch.float32, device=network.device)
        network.forward(rows, {k: torch.empty(0, v.numel(), device=network.device)
                               for k, v in network.initial_state(network.device).items()})

    def _count_step(self, skip: torch.Tensor | None, device: torch.device) -> None:
        """Each tensor's t (the counts tracked for this step), and under grad.nonfinite:
        skip the count of skipped steps."""
        if skip is None:
            self._step_counts.add(1.0)
            return
        # A skipped step counts as no step (bias corrections, schedules by t).
        self._step_counts.add(1.0 - skip.reshape(()))
        skipped = self.state.get("skipped_steps")
        if skipped is None or skipped.device != device:   # the first, or a loaded checkpoint's
            skipped = torch.zeros((), device=device) if skipped is None else skipped.to(device, torch.float32)
            self.state["skipped_steps"] = skipped
        skipped.add_(skip.reshape(()))

    def _init_all_state(self) -> None:
        """Every parameter's state (under shard=..., this rank's) and the optimizer-wide
        state, before the first step: what torch.distributed.checkpoint's
        get/set_optimizer_state_dict expect (else they step once with zero gradients and
        no loss, which a learned optimizer refuses)."""
        program, sharding = self.program, self._sharding
        if sharding is not None:
            sharding.assign([(p, g) for g in self.param_groups for p in g["params"]], self._state_floats)
        device = None
        for group in self.param_groups:
            hyper = {k: float(group[k]) for k in program.hyperparameters}
            for p in group["params"]:
                device = device or p.device
                if sharding is not None and not sharding.owns(p) or p.numel() == 0:
                    continue
                values = dtensor_rows(p, program.class_name)[0] if is_dtensor(p) else p
                axes, _, variant = self._route(p, group, hyper)
                self.state[p].update(self._init_state(values, variant, axes))
        if program.needs_loss and device is not None:
            self.state["loss_buffer"] = self._loss_buffer(device).initial_state(device)
        if self._skips_nonfinite and device is not None:
            self.state["skipped_steps"] = torch.zeros((), device=device)

    # --- state_dict --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's, less the scratch values of tensor functions (recomputed every step).
        With FSDP2's parameters, in the form torch.distributed.checkpoint reshards
        (checkpoint.py)."""
        out = super().state_dict()
        if self.program.tensor_functions:
            out["state"] = {k: {n: v for n, v in s.items() if not is_scratch(n)} if isinstance(s, dict) else s
                            for k, s in out["state"].items()}
        if self._dtensors or self._sharding is not None:
            params = [(p, g) for g in self.param_groups for p in g["params"]]
            if self._sharding is not None:   # an entry per parameter, as DCP's loader asks; others' are empty
                out["state"] = {**{i: {} for i in range(len(params))}, **out["state"]}
            out["state"] = fold_global_state({k: self._as_dtensors(*params[k], s) if isinstance(k, int) else s
                                              for k, s in out["state"].items()})
        return out

    def _accumulator_layout(self, p: torch.Tensor, group: dict, key: str) -> tuple[bool, list[int]]:
        """Whether a state value of p keeps p's dim 0, and its shape for the whole of p."""
        axes, _, variant = self._route(p, group)
        level, channels = self.program.state_levels[key][variant]
        return has_rows(level, axes, p.dim()), [channels, *level_shape(tuple(p.shape), level, axes)]

    def _as_dtensors(self, p: torch.Tensor, group: dict, entry: dict[str, Any]) -> dict[str, Any]:
        if not is_dtensor(p):
            return entry
        shard = dtensor_rows(p, self.program.class_name)[1]
        out = {}
        for key, value in entry.items():
            if key in self.program.state_levels:
                rows, whole = self._accumulator_layout(p, group, key)
                value = sharded_accumulator(value, p, shard, rows, whole)
            out[key] = value
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating state to each parameter's dtype; ours is float32 by design
        # (bf16 accumulators would lose the round trip), so restore it as saved.
        state_dict = {**state_dict, "state": unfold_global_state(state_dict["state"])}
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        self._check_saved_state(state_dict["state"], saved_ids, params)
        self._steady = SteadyTasks()   # (its tasks hold the old state's tensors: freed with it)
        super().load_state_dict(state_dict)
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for index, (p, group) in zip(saved_ids, params):
            if index in state_dict["state"]:
                self.state[p] = {k: self._restore(k, v, p, group) for k, v in state_dict["state"][index].items()}

    def _check_saved_state(self, saved: dict[Any, Any], saved_ids: list[int],
                           params: list[tuple[torch.Tensor, dict]]) -> None:
        """Every accumulator this optimizer keeps is in each saved entry (before anything
        is loaded: a state saved by another version of the spec fails whole)."""
        program = self.program
        for index, (p, group) in zip(saved_ids, params):
            entry = saved.get(index)
            if not entry:   # no state yet (or another rank's, under shard=...)
                continue
            variant = entry.get(ROUTE_KEY) or self._route(p, group)[2]
            missing = sorted(name for name, per_variant in program.state_levels.items()
                             if variant in per_variant and name not in entry and not is_scratch(name))
            if missing:
                raise ValueError(f"{program.class_name}.load_state_dict: the saved state of parameter {index} "
                                 f"(shape {tuple(p.shape)}) has no {', '.join(map(repr, missing))}, which this "
                                 f"{program.class_name} keeps: it was saved by another version of its spec or "
                                 "by another optimizer. Load a state this version saved, or start afresh "
                                 "without loading one.")

    def _restore(self, key: str, value: Any, p: torch.Tensor, group: dict) -> Any:
        if not torch.is_tensor(value):
            return value
        accumulator = key in self.program.state_levels
        if is_dtensor(p):
            local, shard = dtensor_rows(p, self.program.class_name)
            rows = accumulator and self._accumulator_layout(p, group, key)[0]
            value, device = local_accumulator(value, shard, rows, local.shape[0] if local.dim() else 0), local.device
        else:
            device = p.device
        value = value.detach().to(device=device, dtype=torch.float32)
        return _channel_aligned(value) if accumulator else value.clone()
