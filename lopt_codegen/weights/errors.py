"""The one error type of the weights package, and the wording its messages share."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

# group name -> {key: expected shape}
WeightGroups = dict[str, dict[str, tuple[int, ...]]]

# A few published checkpoints, recognised by one key only they have, so that messages can
# name the hub repository to download instead of a vague "the right checkpoint".
KNOWN_HUB_IDS = {
    "network.input.weight": "btherien/mulo",
    "input_weights_": "Pauljanson002/VeLO_MLP",
    "lstm.linear.weight": "Pauljanson002/VeLO_RNN",
}

SHOWN_KEYS = 10  # long key lists are cut: the first few already tell what went wrong


class WeightsError(ValueError):
    """Meta-weights could not be loaded or do not fit: says what, where, and how to fix it."""


def fmt_keys(keys: Iterable[str]) -> str:
    """'a, b, c' for short lists; the first SHOWN_KEYS (sorted) and the count for long ones."""
    ks = sorted(keys)
    text = ", ".join(ks[:SHOWN_KEYS])
    if len(ks) > SHOWN_KEYS:
        text += f", ... ({len(ks)} in all)"
    return text


def group_set_problem(given: Iterable[str], expected: Iterable[str]) -> str | None:
    """'lacks ... and has unknown ...' when the group names differ, else None."""
    missing, extra = set(expected) - set(given), set(given) - set(expected)
    parts = [f"lacks weight group(s) {fmt_keys(missing)}"] if missing else []
    parts += [f"has unknown weight group(s) {fmt_keys(extra)}"] if extra else []
    return " and ".join(parts) or None


def fmt_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def hub_id(keys: Iterable[str]) -> str | None:
    """The hub repository a group's key set comes from, when it is a known checkpoint."""
    keys = set(keys)
    return next((hub for key, hub in KNOWN_HUB_IDS.items() if key in keys), None)


def layout_hint(groups: Mapping[str, Mapping[str, object]]) -> str:
    """What a user should pass for these groups (the end of a 'expected ...' sentence)."""
    if len(groups) == 1:
        hub = hub_id(next(iter(groups.values())))
        example = f"e.g. a local download of {hub}" if hub else "e.g. a local download of the checkpoint"
        return (f"a folder with config.json + model.safetensors (the PyLO hub layout, {example}) "
                "or a .safetensors / .pt file")
    per_group = []
    for name, keys in groups.items():
        hub = hub_id(keys)
        per_group.append(f"{name}: {hub}" if hub else name)
    return ("a folder holding one PyLO hub folder (config.json + model.safetensors) per weight group "
            f"({', '.join(per_group)}), a dict {{group: path}}, or one .safetensors / .pt file "
            "holding every group's keys")


def download_hint(groups: Mapping[str, Mapping[str, object]]) -> str:
    """Nothing is fetched at run time (reproducible, works offline): say how to get it once."""
    hubs = [h for h in (hub_id(keys) for keys in groups.values()) if h]
    how = ""
    if hubs:
        how = " (e.g. " + "; ".join(
            f"`huggingface-cli download {h} --local-dir {h.split('/')[-1]}`" for h in hubs) + ")"
    return f"Nothing is downloaded at run time: download the weights once{how} and pass the local path."
