"""An on-disk cache of compiled kernel modules, shared by processes.

An entry is a folder named by the sha256 of its key (everything the binary depends on:
spec hash, shapes, dtypes, target, compiler versions). It holds the artifact and a
`meta.json` with the artifact's sha256, written last: an entry without a matching
meta.json (a crash mid-write, a truncated or edited file) is rebuilt, never trusted.
Builders write into a temporary folder renamed into place, and a per-key file lock makes
concurrent processes that need the same key build it once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_VERSION = 1   # bump when the entry layout changes


def cache_dir() -> Path:
    """LOPT_CACHE_DIR, else $XDG_CACHE_HOME/lopt_codegen, else ~/.cache/lopt_codegen."""
    env = os.environ.get("LOPT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lopt_codegen"


def key_digest(key: dict) -> str:
    text = json.dumps({"cache_version": _VERSION, **key}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _valid_artifact(entry: Path, filename: str) -> Path | None:
    artifact, meta = entry / filename, entry / "meta.json"
    try:
        recorded = json.loads(meta.read_text())["sha256"]
        return artifact if recorded == _file_sha256(artifact) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_entry(entry: Path, key: dict, filename: str, build: Callable[[Path], None]) -> Path:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        build(tmp / filename)
        meta = {"sha256": _file_sha256(tmp / filename), "key": key}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        if entry.exists():
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry / filename


class BuildCache:
    """Counts what it did (hits, builds) so tests and benchmarks can tell."""

    def __init__(self, root: Path | None = None):
        self.root = root
        self.hits = 0
        self.builds = 0

    @property
    def path(self) -> Path:
        return self.root or cache_dir()

    def get(self, kind: str, key: dict, filename: str, build: Callable[[Path], None],
            load: Callable[[Path], T]) -> T:
        """The loaded artifact for `key`, building it (into the given path) when it is
        missing, corrupted or fails to load."""
        entry = self.path / kind / key_digest(key)
        loaded = self._load_valid(entry, filename, load)
        if loaded is not None:
            return loaded[0]
        with _locked(self.path / kind / f"{entry.name}.lock"):
            # Another process may have built it while we waited for the lock.
            loaded = self._load_valid(entry, filename, load)
            if loaded is not None:
                return loaded[0]
            artifact = _build_entry(entry, key, filename, build)
            self.builds += 1
            return load(artifact)

    def _load_valid(self, entry: Path, filename: str, load: Callable[[Path], T]) -> tuple[T] | None:
        """(loaded,) for a valid entry that loads; None otherwise (an entry that fails to
        load is removed so that it gets rebuilt)."""
        artifact = _valid_artifact(entry, filename)
        if artifact is None:
            return None
        try:
            loaded = load(artifact)
        except Exception:  # noqa: BLE001 - whatever the loader says, the entry is unusable
            (entry / "meta.json").unlink(missing_ok=True)
            return None
        self.hits += 1
        return (loaded,)


DEFAULT_CACHE = BuildCache()
