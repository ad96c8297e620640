"""Imports point down the layers (DESIGN.md "Layers"): the control client stays light, and
no module of rblock/ or hvctl/ imports, directly or around a circle, one that imports it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.import_graph import REPO, find_cycles, import_graph

LOWER_LAYERS = ("rblock.replica", "rblock.store", "rblock.nbd")


def _loaded_by(module: str) -> list[str]:
    """The rblock modules a fresh interpreter holds after `import MODULE`."""
    code = (f"import json, sys; import {module}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith('rblock'))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True)
    return json.loads(res.stdout)


def test_control_client_loads_no_lower_layer():
    loaded = _loaded_by("rblock.control_client")
    assert "rblock.control_client" in loaded, loaded
    heavy = [m for m in loaded if m.startswith(LOWER_LAYERS)]
    assert not heavy, f"importing rblock.control_client loads {heavy}"


def test_hvctl_controller_loads_no_lower_layer():
    heavy = [m for m in _loaded_by("hvctl.controller") if m.startswith(LOWER_LAYERS)]
    assert not heavy, f"importing hvctl.controller loads {heavy}"


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_sees_late_and_relative_imports(tmp_path):
    """The finder itself: a function-level import and a relative import both close a circle."""
    pkg = tmp_path / "rblock"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from rblock import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "c.py").write_text("import rblock.a\ng = 1\n")
    (pkg / "d.py").write_text("from rblock.a import b\n")  # leaf: imports, not imported
    (tmp_path / "hvctl").mkdir()
    assert find_cycles(import_graph(tmp_path)) == [["rblock.a", "rblock.b", "rblock.c",
                                                    "rblock.a"]]
