"""Load the Program a generated package ships (program.json next to its __init__.py)."""
from __future__ import annotations

import os

from ..ir.program import Program
from ..ir.serialize import program_from_json


def load_program(package_file: str) -> Program:
    path = os.path.join(os.path.dirname(os.path.abspath(package_file)), "program.json")
    with open(path, encoding="utf-8") as f:
        return program_from_json(f.read())
