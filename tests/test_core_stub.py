"""The hand-kept type stub of the compiled core matches the module (mypy's stubtest)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent


def test_core_stub_matches_the_module():
    if shutil.which("stubtest", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mypy's stubtest is not installed (pip install '.[test]')")
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "stubtest"),
            "fastckpt._core",
            "--allowlist",
            str(HERE / "fastckpt" / "_core" / "stubtest-allowlist.txt"),
            "--mypy-config-file",
            str(HERE / "tests" / "stubtest-mypy.ini"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=HERE,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
