"""The on-disk build cache: hits across processes, concurrent builders, corrupted entries."""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from lopt_codegen.backends.build_cache import BuildCache, key_digest

KEY = {"spec": "abc", "shape": [3, 4], "target": "llvm"}


def _slow_build(path: Path) -> None:
    time.sleep(0.3)   # long enough for two processes to overlap
    path.write_text("artifact for " + str(KEY))


def _get(root: str) -> tuple[str, int, int]:
    cache = BuildCache(Path(root))
    text = cache.get("test", KEY, "module.txt", _slow_build, lambda p: p.read_text())
    return text, cache.hits, cache.builds


def test_second_process_hits(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        assert pool.apply(_get, (str(tmp_path),))[1:] == (0, 1)
    with ctx.Pool(1) as pool:
        text, hits, builds = pool.apply(_get, (str(tmp_path),))
    assert (hits, builds) == (1, 0)
    assert text == "artifact for " + str(KEY)


def test_concurrent_builders_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_get, [str(tmp_path)] * 2)
    assert all(text == "artifact for " + str(KEY) for text, _, _ in results)
    assert sorted((h, b) for _, h, b in results) == [(0, 1), (1, 0)]
    leftovers = [p.name for p in (tmp_path / "test").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("damage", ["truncate", "same_size", "meta", "delete_meta"])
def test_corrupted_entry_is_rebuilt(tmp_path, damage):
    cache = BuildCache(tmp_path)
    _get(str(tmp_path))

    def read() -> str:
        return cache.get("test", KEY, "module.txt", _slow_build, lambda p: p.read_text())
    assert read() == "artifact for " + str(KEY)   # a hit: its checksum checked in this process
    entry = tmp_path / "test" / key_digest(KEY)
    if damage == "truncate":
        (entry / "module.txt").write_text("garb")
    elif damage == "same_size":   # (checked in this process before, and checked again)
        artifact = entry / "module.txt"
        artifact.write_text("X" * len(artifact.read_text()))
    elif damage == "meta":
        (entry / "meta.json").write_text("{not json")
    else:
        (entry / "meta.json").unlink()
    assert read() == "artifact for " + str(KEY)
    assert (cache.hits, cache.builds) == (1, 1)


def test_entry_that_fails_to_load_is_rebuilt(tmp_path):
    cache = BuildCache(tmp_path)
    _get(str(tmp_path))
    loads = []

    def load(p: Path) -> str:
        loads.append(p)
        if len(loads) == 1:
            raise OSError("invalid ELF header")
        return p.read_text()

    assert cache.get("test", KEY, "module.txt", _slow_build, load) == "artifact for " + str(KEY)
    assert cache.builds == 1


def test_failed_build_leaves_nothing(tmp_path):
    cache = BuildCache(tmp_path)

    def broken(path: Path) -> None:
        path.write_text("half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.get("test", KEY, "module.txt", broken, lambda p: p.read_text())
    assert [p.name for p in (tmp_path / "test").iterdir() if not p.name.endswith(".lock")] == []


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    from lopt_codegen.backends.build_cache import cache_dir
    monkeypatch.setenv("LOPT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "lopt_codegen"
