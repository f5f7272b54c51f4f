"""Read weight files and folders from disk (never the network) into named key -> tensor dicts."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import WeightsError, download_hint, fmt_keys, layout_hint

SAFETENSORS_EXT = (".safetensors",)
TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")
# Preferred first: safetensors cannot run code and is what PyLO uploads.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """One file's tensors, with the name every message about them uses."""
    name: str
    tensors: Mapping[str, Any]


def read_path(path: str | os.PathLike, groups: Mapping[str, Mapping[str, Any]]) -> list[Source]:
    """A file or hub folder gives one source; any other folder gives its hub subfolders and files."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise WeightsError(_not_found(str(path), groups))
    if p.is_file():
        return [Source(str(p), read_file(p))]
    hub = hub_file(p)
    if hub is not None:
        return [Source(str(hub), read_file(hub))]
    sources = []
    for child in sorted(p.iterdir()):
        if child.name.startswith("."):  # .cache/, .git/ of a hub download are never weights
            continue
        if child.is_dir() and hub_file(child) is not None:
            hub = hub_file(child)
            sources.append(Source(str(hub), read_file(hub)))
        elif child.is_file() and child.suffix in SAFETENSORS_EXT + TORCH_EXT:
            sources.append(Source(str(child), read_file(child)))
    if not sources:
        raise WeightsError(f"the folder {p} holds no weights: no {' or '.join(HUB_FILES)}, no subfolder "
                           f"with one, and no .safetensors / .pt file. Expected {layout_hint(groups)}.")
    return sources


def hub_file(folder: Path) -> Path | None:
    """The weights file of a PyLO / Hugging Face hub folder (config.json is optional)."""
    return next((folder / f for f in HUB_FILES if (folder / f).is_file()), None)


def read_file(path: Path) -> dict[str, Any]:
    """key -> tensor of one file; any failure to read it names the file and the likely cause."""
    kind = _file_kind(path)
    try:
        if kind == "safetensors":
            return dict(load_file(str(path), device="cpu"))
        # weights_only: a checkpoint from the internet must not be able to run code.
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip all raise their own types
        what = ("a safetensors file" if kind == "safetensors"
                else "a torch.save state dict (loaded with weights_only=True)")
        raise WeightsError(f"could not read {path} as {what}: {type(exc).__name__}: {_first_line(exc)}. "
                           "The file is corrupted, truncated, or not a plain tensor state dict: "
                           "download it again, or re-save it with torch.save(model.state_dict(), path) "
                           "or safetensors.torch.save_file.") from exc
    return _as_state_dict(loaded, path)


def _file_kind(path: Path) -> str:
    """By extension; unknown extensions by their first bytes, so renamed files still load."""
    if path.suffix in SAFETENSORS_EXT:
        return "safetensors"
    if path.suffix in TORCH_EXT:
        return "torch"
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise WeightsError(f"could not open {path}: {exc}") from exc
    if head[8:9] == b"{":          # safetensors: u64 header length, then a JSON header
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save: zip archive, or legacy pickle
        return "torch"
    raise WeightsError(f"{path} is neither a safetensors file nor a torch.save file (by extension and "
                       "content); expected a .safetensors, .pt, .pth or .bin file, or a hub folder.")


def _as_state_dict(loaded: Any, path: Path) -> dict[str, Any]:
    if not isinstance(loaded, Mapping):
        raise WeightsError(f"{path} holds a {type(loaded).__name__}, not a state dict {{key: tensor}}; "
                           "save one with torch.save(model.state_dict(), path).")
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path} is not a flat state dict: {fmt_keys(not_tensors)} hold(s) no tensor "
                           "(a nested checkpoint?). Save the flat dict of tensors, e.g. "
                           "torch.save(model.state_dict(), path), with one file per weight group.")
    return {str(k): v for k, v in loaded.items()}


def _not_found(path: str, groups: Mapping[str, Mapping[str, Any]]) -> str:
    if "://" in path:
        what = "is a URL, not a local path"
    elif _HUB_ID.match(path):
        what = "does not exist (hub ids are not resolved: pass the folder you downloaded it to)"
    else:
        what = "does not exist"
    return f"weights path '{path}' {what}. Expected {layout_hint(groups)}. {download_hint(groups)}"


def _first_line(exc: Exception) -> str:
    """The gist of a library error: torch's weights_only errors run on for paragraphs."""
    lines = str(exc).strip().splitlines()
    text = lines[0].split(". ")[0].rstrip(".") if lines else "(no message)"
    return text[:300]
