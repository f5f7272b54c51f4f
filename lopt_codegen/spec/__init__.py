"""Spec language: YAML -> validated `Spec` objects; errors carry file:line:col."""
from .errors import Mark, SpecError
from .loader import load_spec, parse_spec
from .model import Spec
from .schema import SPEC_SCHEMA

__all__ = ["Mark", "SpecError", "Spec", "SPEC_SCHEMA", "load_spec", "parse_spec"]
