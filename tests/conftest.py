"""Shared fixtures: the built-in programs compiled once per session."""
from __future__ import annotations

import os

import pytest

from lopt_codegen.ir import lower_spec
from lopt_codegen.spec import load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECS = os.path.join(ROOT, "specs")

# Shapes every backend is checked on: 0-D, 1-D, odd 2-D both orientations, square (VeLO's
# tie rule), size-1 axes, 3-D, and 4-D (conv, including a tie on axes (0, 1)).
SHAPES = [(), (1,), (7,), (5, 3), (3, 5), (4, 4), (1, 6), (6, 1), (2, 3, 4), (3, 3, 2, 2), (4, 2, 3, 3)]


@pytest.fixture(scope="session")
def programs():
    return {name: lower_spec(load_spec(os.path.join(SPECS, f"{name}.yaml")))
            for name in ("small_fc_lopt", "velo", "adam")}


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    """The build cache of this session: each kernel module builds once per session and
    never lands in the user's cache."""
    from lopt_codegen.backends.build_cache import DEFAULT_CACHE

    DEFAULT_CACHE.root = tmp_path_factory.mktemp("kernel-cache")
    yield DEFAULT_CACHE
    DEFAULT_CACHE.root = None
