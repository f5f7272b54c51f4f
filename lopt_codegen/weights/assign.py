"""Match weight sources (files, hub folders) to weight groups by key set, never by name.

Folder names are whatever the user downloaded to (VeLO_MLP/, velo-mlp/, snapshot hashes);
the keys inside are what identify a group. A source may serve several groups when their
key sets are disjoint (one file holding everything).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from .errors import WeightGroups, WeightsError, fmt_keys
from .files import Source

SHOWN_SOURCES = 6


def assign(sources: Sequence[Source], groups: WeightGroups, ignore: Mapping[str, Sequence[str]],
           where: str) -> dict[str, Source]:
    """group -> the source holding its keys (ignored extras dropped, other extras kept for the check).

    `where` names what the user passed (a folder, a state dict) for the messages.
    """
    if len(sources) == 1:
        owner = {g: sources[0] for g in groups}  # one source: a plain key check says more than "no match"
    else:
        owner = _match(sources, groups, where)
    result = {}
    for source in {id(s): s for s in owner.values()}.values():
        served = [g for g in groups if owner[g] is source]
        for g, tensors in _split(source, served, groups, ignore).items():
            result[g] = Source(source.name, tensors)
    return result


def ignored(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def _match(sources: Sequence[Source], groups: WeightGroups, where: str) -> dict[str, Source]:
    overlaps = {g: [s for s in sources if set(s.tensors) & set(keys)] for g, keys in groups.items()}
    by_name = "a dict {" + ", ".join(f"'{g}': path" for g in groups) + "}"
    for g, found in overlaps.items():
        if not found:
            raise WeightsError(
                f"no weights in {where} hold any key of weight group '{g}' (expects "
                f"{fmt_keys(groups[g])}); found {_describe(sources)}. Add that group's hub folder "
                f"(config.json + model.safetensors) to {where}, or pass {by_name}.")
        if len(found) > 1:
            raise WeightsError(
                f"weight group '{g}' matches several sources in {where} by key set: "
                f"{', '.join(s.name for s in found)}. Keep one per group there, or pass {by_name}.")
    used = {id(s) for found in overlaps.values() for s in found}
    stray = [s for s in sources if id(s) not in used]
    if stray:
        raise WeightsError(
            f"{where} holds weights that match none of the weight groups {', '.join(groups)}: "
            f"{_describe(stray)}. Move them out of {where}, or pass {by_name}.")
    return {g: found[0] for g, found in overlaps.items()}


def _split(source: Source, served: list[str], groups: WeightGroups,
           ignore: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
    """Each key to the group expecting it; extras dropped when ignored, else reported."""
    if len(served) > 1:
        for i, a in enumerate(served):
            for b in served[i + 1:]:
                shared = set(groups[a]) & set(groups[b])
                if shared:
                    raise WeightsError(
                        f"{source.name} would have to hold weight groups '{a}' and '{b}' at once, but "
                        f"their key sets share {fmt_keys(shared)}, so its keys cannot be told apart. "
                        "Pass a dict {group: path} with one file per group.")
    owner_of = {k: g for g in served for k in groups[g]}
    patterns = [p for g in served for p in ignore.get(g, ())]
    parts: dict[str, dict[str, Any]] = {g: {} for g in served}
    extra = []
    for key, value in source.tensors.items():
        if key in owner_of:
            parts[owner_of[key]][key] = value
        elif not ignored(key, patterns):
            extra.append(key)
    if extra and len(served) == 1:
        parts[served[0]].update({k: source.tensors[k] for k in extra})  # the check lists them
    elif extra:
        raise WeightsError(
            f"{source.name} has {len(extra)} key(s) that belong to none of the weight groups "
            f"{', '.join(served)}: {fmt_keys(extra)}. This is not the checkpoint the spec describes; "
            "if the keys are harmless extras, list fnmatch patterns for them under the spec's "
            "weights.ignore.")
    return parts


def _describe(sources: Sequence[Source]) -> str:
    shown = []
    for s in sources[:SHOWN_SOURCES]:
        keys = sorted(s.tensors)
        shown.append(f"{s.name} (keys {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    more = f" and {len(sources) - SHOWN_SOURCES} more" if len(sources) > SHOWN_SOURCES else ""
    return "; ".join(shown) + more if shown else "nothing"
