"""A step whose tasks are the last step's. Between two training steps the host side of
a step usually finds what it found the step before: the same parameters at the same
addresses, gradients of the same kinds (new tensors at new addresses), the same state
tensors. `host_key` reads all of that at about 1.4 us a tensor (Adam's); a step whose key
is the last step's takes the last step's TensorTasks, their gradients (and, where a
schedule changed them, their hyperparameters) set anew, instead of finding them again
and keying the tvm replay on them (3.5 us a tensor: 0.7 ms of a 1.4 ms Adam step on 200
tensors, 0.9 ms now).

Each set of tasks has a `generation`, new whenever they are found again; a backend may
repeat what it did at the last step of the same generation (tvm/replay.py), with the
new gradients and hyperparameter values. Hyperparameter values are kept out of the key:
an LR schedule changes them every step, and a step on 200 tensors then took 3.0 ms
against 1.4 for the same step replayed."""
from __future__ import annotations

from itertools import chain, compress, count, repeat
from operator import attrgetter, is_not
from typing import Any, Callable

import torch

from ..backends.base import TensorTask

Route = Callable[[TensorTask, int], tuple[tuple[int, int] | None, dict[str, float], str]]
_GENERATIONS = count(1)   # (unique across optimizers: a backend object could serve two)
_GRAD = attrgetter("grad")
_PARAM_FORM = attrgetter("dtype", "shape")
_GRAD_FORM = attrgetter("dtype", "layout")
_data_ptr, _is_contiguous, _stride = torch.Tensor.data_ptr, torch.Tensor.is_contiguous, torch.Tensor.stride


def host_key(param_groups: list[dict], state: dict, group_values: list[str], addresses: bool
             ) -> tuple[tuple, list]:
    """What a step's tasks are made of, less the hyperparameters' values, and each
    parameter's gradient (None where unset), in param-group order. `group_values`: the
    names of per-parameter values the tasks read from their groups or parameters (μP's);
    `addresses`: whether the state tensors' addresses and strides count (for a backend
    that replays steps: Backend.replays_steps; 2x the key's time on VeLO's state).
    (Each property is read for all tensors at once by C-level maps: 2x faster than a
    Python loop over the tensors.)"""
    key: list[Any] = []
    grads: list[torch.Tensor | None] = []
    for group in param_groups:
        params = group["params"]
        if group_values:
            key.append(tuple(float(group[n]) if n in group else None for n in group_values))
            key.append(tuple(id(getattr(p, "infshape", None)) for p in params))
        # (`.data = ...` keeps the parameter object: its pointer, dtype and shape too)
        key += (tuple(map(id, params)), tuple(map(_data_ptr, params)), tuple(map(_PARAM_FORM, params)),
                tuple(map(_is_contiguous, params)))
        group_grads = list(map(_GRAD, params))
        grads += group_grads
        has_grad = tuple(map(is_not, group_grads, repeat(None)))
        present = list(compress(group_grads, has_grad))
        key += (has_grad, tuple(map(_GRAD_FORM, present)), tuple(map(_is_contiguous, present)))
    # Which dict is whose state (`opt.state[p] = {}` keeps the number of entries), and
    # the parameters' state values, by object and, tensors, pointer and strides (kernels
    # write them through pointers; `.data = m.data.t()` keeps both object and pointer).
    # The optimizer's own entries, the loss buffer's, change every step: no task reads them.
    key += (tuple(map(id, state)), tuple(map(id, state.values())))
    values = list(chain.from_iterable(entry.values() for owner, entry in state.items() if not isinstance(owner, str)))
    key.append(tuple(map(id, values)))
    if not addresses:
        return tuple(key), grads
    try:
        key += (tuple(map(_data_ptr, values)), tuple(map(_stride, values)))
    except TypeError:   # (not all tensors: a routed optimizer's route names)
        key.append(tuple((v.data_ptr(), v.stride()) for v in values if isinstance(v, torch.Tensor)))
    return tuple(key), grads


def _objects(param_groups: list[dict], state: dict) -> list[Any]:
    """Every object whose id a host key holds: kept while the key is compared, so that no
    new object takes one of their ids."""
    held: list[Any] = [p for group in param_groups for p in group["params"]]
    held += [getattr(p, "infshape", None) for p in held]
    held += [*state, *state.values()]
    held += [v for owner, entry in state.items() if not isinstance(owner, str) for v in entry.values()]
    return held


class SteadyTasks:
    """The last step's tasks, the key they were found from and their generation."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tasks: list[TensorTask] = []
        self.hyper: tuple = ()   # each param group's hyperparameter values the tasks hold
        self.generation: int | None = None
        self._slots: list[int] = []    # each task's parameter among host_key's
        self._groups: list[int] = []   # each task's param group
        self._held: list[Any] = []     # _objects'

    def remember(self, key: tuple, tasks: list[TensorTask], hyper: tuple, param_groups: list[dict],
                 state: dict) -> None:
        """`tasks`, found from `key` (host_key's of param_groups and state) and the groups'
        hyperparameter values `hyper`: a new generation."""
        index = {id(p): (i, g) for i, (g, p) in enumerate((g, p) for g, group in enumerate(param_groups)
                                                           for p in group["params"])}
        self.key, self.tasks, self.hyper = key, tasks, hyper
        self._slots = [index[id(t.param)][0] for t in tasks]
        self._groups = [index[id(t.param)][1] for t in tasks]
        self._held = _objects(param_groups, state)
        self.generation = next(_GENERATIONS)

    def rekey(self, key: tuple, param_groups: list[dict], state: dict) -> None:
        """The same tasks, generation and all, whose step replaced state tensors (made them
        rows of one tensor: StepBatch.replaced_states): `key`, host_key's after that step,
        is the one later steps are compared with."""
        self.key, self._held = key, _objects(param_groups, state)

    def take(self, grads: list, hyper: tuple, names: list[str], route: Route | None) -> bool:
        """The last step's tasks on this step's gradients and hyperparameter values
        (`hyper`: each param group's values of `names`), if these leave every task's
        route as it was (`route(task, group)`: its axes, hyperparameters and graph; None
        where neither the routes nor per-parameter values read them: a task's are its
        group's); False (nothing changed) if not."""
        if hyper != self.hyper:
            changed = {g: dict(zip(names, values)) for g, (old, values) in enumerate(zip(self.hyper, hyper))
                       if old != values}
            if route is None:
                for task, g in zip(self.tasks, self._groups):
                    if g in changed:
                        task.hyper = changed[g]
            else:
                routes = [(task, route(task, g)) for task, g in zip(self.tasks, self._groups) if g in changed]
                if any((axes, variant) != (task.axes, task.variant) for task, (axes, _, variant) in routes):
                    return False
                for task, (_, task_hyper, _) in routes:
                    task.hyper = task_hyper
            self.hyper = hyper
        for task, slot in zip(self.tasks, self._slots):
            task.grad = grads[slot]
        return True

    def drop_grads(self) -> None:
        """After the step: the tasks hold no gradient, so that zero_grad() frees them
        (the next step sets them anew)."""
        for task in self.tasks:
            task.grad = None
