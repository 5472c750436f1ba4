"""`import fastckpt` in a training script costs what loading needs: the CLI's libraries,
pretty printing, the bench, the suggestion engine, diff and the training helpers are
imported when first used (figures: bench/RESULTS.md, "import time")."""

import json

from tests.conftest import run_python

# Modules `import fastckpt` must not import (each checked in a fresh interpreter).
HEAVY = (
    "rich",
    "typer",
    "click",
    "matplotlib",
    "transformers",
    "fastckpt.cli",
    "fastckpt.bench",
    "fastckpt.tools",
    "fastckpt.training",
    "fastckpt.suggest",
    # what a plain load of a local file never uses: URLs, read="once"/"pread", the
    # translation of transformers' conversions (each module's classes cost at import)
    "fastckpt.source.remote",
    "fastckpt.source.remote_store",
    "fastckpt.load.read_once",
    "fastckpt.load.remote_reads",
    "fastckpt.planning.hf_conversions",
)

SCRIPT = """
import json, sys
import torch
before = set(sys.modules)
import fastckpt
new = sorted(set(sys.modules) - before)
heavy = json.loads(sys.argv[1])
found = [m for m in new if any(m == h or m.startswith(h + ".") for h in heavy)]
# what was left out is still there, on first use
lazy = [fastckpt.diff, fastckpt.DiffReport, fastckpt.freeze, fastckpt.resume, fastckpt.save]
from fastckpt import FreezeSummary, ResumeReport
print(json.dumps({"found": found, "lazy": [x.__module__ for x in lazy]}))
"""


def test_import_fastckpt_leaves_the_heavy_modules_out():
    r = run_python(SCRIPT, json.dumps(HEAVY))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["found"] == []
    assert out["lazy"] == [
        "fastckpt.tools.diff",
        "fastckpt.tools.diff",
        "fastckpt.training.freezing",
        "fastckpt.training.resuming",
        "fastckpt.training.saving",
    ]


def test_an_unknown_attribute_is_still_an_attribute_error():
    r = run_python("import fastckpt\ntry:\n    fastckpt.nope\nexcept AttributeError as e:\n"
                   "    print('ok', e)")
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
