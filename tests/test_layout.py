"""The package's layers (pyproject's import-linter contract, run by `make lint`) and the one
import that contract cannot see: a module below the CLI importing the root package, which
imports every layer."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastckpt"
BELOW_THE_CLI = ("source", "planning", "suggest", "load", "training", "tools")


def _root_imports(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            lines += [node.lineno for a in node.names if a.name == "fastckpt"]
        elif isinstance(node, ast.ImportFrom) and node.module == "fastckpt" and node.level == 0:
            lines.append(node.lineno)
    return lines


def test_no_layer_below_the_cli_imports_the_root_package() -> None:
    found = {
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for layer in BELOW_THE_CLI
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for line in _root_imports(path)
    }
    assert not found, f"import the module that holds the function instead: {sorted(found)}"


def test_the_check_sees_a_root_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import fastckpt._core as _core\nimport fastckpt\nfrom fastckpt import plan\n")
    assert _root_imports(probe) == [2, 3]
