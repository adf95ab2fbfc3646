"""The architecture is a tested contract: the import layers in pyproject.toml, and short functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
MAX_FUNCTION_LINES = 100


def test_import_contracts_are_kept():
    """cli > run > stages > libraries > ground floor; stages independent; no cycles (see [tool.importlinter])."""
    # The venv's own script, in a child process: in-process, import-linter closes the streams pytest captures.
    script = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(script), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    assert "Contracts:" in report, report  # it ran and checked the contracts (not a missing script)
    assert proc.returncode == 0, report[report.find("Broken contracts"):]


def _long_functions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # Counted from the first decorator to the last line of the body, as a reader sees it.
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines = node.end_lineno - start + 1
            if lines > MAX_FUNCTION_LINES:
                out.append(f"{path.relative_to(root)}:{start} {node.name} ({lines} lines)")
    return out


def test_no_function_is_over_100_lines():
    long = [f for p in sorted((ROOT / "edgekd").rglob("*.py")) for f in _long_functions(p)]
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_length_check_finds_a_long_function(tmp_path):
    """The check above can fail: a 101-line function is reported, a 100-line one is not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(99))
    path = tmp_path / "probe.py"
    path.write_text(f"def long():\n{body}\n    return 0\n\n\ndef short():\n{body}\n")
    assert _long_functions(path, tmp_path) == ["probe.py:1 long (101 lines)"]


def test_every_subpackage_ships_in_the_wheel():
    """pyproject's hand-written `packages` list names every package under edgekd/ (a missing one imports from a
    checkout but not from an installed wheel)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgekd").rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
