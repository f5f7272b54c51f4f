"""Shared fixtures: the built-in programs compiled once per session."""
from __future__ import annotations

import os

import pytest

from lopt_codegen.ir import lower_spec
from lopt_codegen.spec import load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiled kernels of a test run go next to pytest's own cache (kept between local runs;
# keys include the compiler's source hash, so an edit never loads a stale kernel), not
# into the user's cache folder.
os.environ.setdefault("LOPT_CACHE_DIR", os.path.join(ROOT, ".pytest_cache", "lopt_kernels"))
# Kernels built when first needed, not in the background: every tvm step of a test runs
# the kernels it names (tests/test_tvm_tiers.py tests the background builds).
os.environ.setdefault("LOPT_BACKGROUND_BUILDS", "0")
SPECS = os.path.join(ROOT, "specs")

# Shapes every backend is checked on: 0-D, 1-D, odd 2-D both orientations, square (VeLO's
# tie rule), size-1 axes, 3-D, and 4-D (conv, including a tie on axes (0, 1)).
SHAPES = [(), (1,), (7,), (5, 3), (3, 5), (4, 4), (1, 6), (6, 1), (2, 3, 4), (3, 3, 2, 2), (4, 2, 3, 3)]


@pytest.fixture(scope="session")
def programs():
    return {name: lower_spec(load_spec(os.path.join(SPECS, f"{name}.yaml")))
            for name in ("small_fc_lopt", "velo", "adam", "elo", "mulo", "celo2", "elo_celo2")}


@pytest.fixture
def quiet_machine(monkeypatch):
    """The tvm backend's steps on torch's threads whatever else runs (make test's other
    worker): no look at the machine finds it busy (threads.Contention)."""
    from lopt_codegen.backends.tvm.threads import CONTENTION
    monkeypatch.setattr(CONTENTION, "probe", lambda: 0)
    monkeypatch.setattr(CONTENTION, "steps", 0)
    monkeypatch.setattr(CONTENTION, "busy", False)
    monkeypatch.setattr(CONTENTION, "_seen_change", False)


class InfShape:
    """What mup.set_base_shapes attaches to a parameter, as far as MuLO reads it."""

    def __init__(self, ninf: int, width_mult: float):
        self._ninf, self._width_mult = ninf, width_mult

    def ninf(self) -> int:
        return self._ninf

    def width_mult(self) -> float:
        return self._width_mult
