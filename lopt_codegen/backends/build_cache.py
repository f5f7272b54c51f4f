"""An on-disk cache of compiled kernel modules, shared by processes.

An entry is a folder named by the sha256 of its key (everything the binary depends on:
spec hash, shapes, dtypes, target, compiler versions). It holds the artifact and a
`meta.json` with the artifact's sha256, written last: an entry without a matching
meta.json (a crash mid-write, a truncated or edited file) is rebuilt, never trusted.
Builders write into a temporary folder renamed into place, and a per-key file lock makes
concurrent processes that need the same key build it once; a build removes the temporary
folders that killed builds of its key left (and any a day old).

A cache folder that cannot be used (read-only, a file, under /proc) does not stop
training: the process warns once, naming LOPT_CACHE_DIR, and caches in a private
temporary folder removed at exit.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_VERSION = 1   # bump when the entry layout changes
_STALE_TEMP_S = 24 * 3600   # a temporary folder this old is a dead build's, whatever its key
_usable: dict[Path, Path] = {}   # a configured cache folder -> the folder used for it
_checked: dict[Path, tuple] = {}   # artifacts whose checksum matched -> their files' identities then


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


def _identity(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _valid_artifact(entry: Path, filename: str) -> Path | None:
    """The entry's artifact where its checksum matches the one recorded, checked once per
    process while the files are unchanged (a first step asked has() then get() of each
    kernel: two checksums of every file)."""
    artifact, meta = entry / filename, entry / "meta.json"
    try:
        seen = (_identity(artifact), _identity(meta))
        if _checked.get(artifact) == seen:
            return artifact
        if json.loads(meta.read_text())["sha256"] != _file_sha256(artifact):
            return None
        _checked[artifact] = seen
        return artifact
    except (OSError, ValueError, KeyError, TypeError):
        return None


def usable_dir(root: Path) -> Path:
    """`root` if this process can create and write files there, else (with one warning
    naming LOPT_CACHE_DIR) a private temporary folder removed at exit."""
    if root not in _usable:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=root):
                pass
            _usable[root] = root
        except OSError as exc:
            private = Path(tempfile.mkdtemp(prefix="lopt_codegen_cache_"))
            atexit.register(shutil.rmtree, private, ignore_errors=True)
            warnings.warn(f"the kernel cache {root} (LOPT_CACHE_DIR, else $XDG_CACHE_HOME/lopt_codegen or "
                          f"~/.cache/lopt_codegen) cannot be used ({exc.strerror or exc}); this process caches "
                          f"compiled kernels in {private}, removed at exit. Set LOPT_CACHE_DIR to a writable "
                          "folder to keep them across runs.", RuntimeWarning, stacklevel=3)
            _usable[root] = private
    return _usable[root]


def _remove_dead_temps(entry: Path) -> None:
    """Temporary folders of builds that died: this key's (its lock is held, so no live
    build of it has one) and any over a day old."""
    now = time.time()
    for tmp in entry.parent.glob(".*"):
        if not tmp.is_dir():
            continue
        try:
            if tmp.name.startswith(f".{entry.name}.") or now - tmp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _build_entry(entry: Path, key: dict, filename: str, build: Callable[[Path], None]) -> Path:
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(entry)
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
        return usable_dir(self.root or cache_dir())

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

    def has(self, kind: str, key: dict, filename: str) -> bool:
        """Whether a valid entry for `key` is there (nothing is built or loaded)."""
        return _valid_artifact(self.path / kind / key_digest(key), filename) is not None

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
