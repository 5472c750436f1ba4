"""Hostile, broken and changing files: CheckpointError, never a crash or code execution.

Every file is opened in a subprocess (tests/hostile.py ``run``), so a segfault or
an abort fails the one case that caused it instead of killing pytest. The corpus
is generated (tests/hostile.py); payloads are proven live against pickle/torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests import hostile
from tests.conftest import run_python

REPO = Path(__file__).resolve().parent.parent


def run_isolated(files: list[Path]) -> dict[str, dict]:
    """Opens each file in a child process; a child that dies is restarted after its culprit."""
    results: dict[str, dict] = {}
    pending = [str(f) for f in files]
    while pending:
        proc = subprocess.run(
            [sys.executable, "-m", "tests.hostile", "run", *pending],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=900,
        )
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        for r in lines:
            results[r["file"]] = r
        if proc.returncode == 0 and len(lines) == len(pending):
            break
        culprit = pending[len(lines)]
        results[culprit] = {
            "file": culprit,
            "outcome": "crashed",
            "returncode": proc.returncode,
            "stderr": proc.stderr[-4000:],
        }
        pending = pending[len(lines) + 1 :]
    return results


# Built once at import: the case names are the test ids. Payloads point at this
# fresh, empty folder; nothing but a payload that ran can create files in it.
SENTINELS = Path(tempfile.mkdtemp(prefix="fastckpt-sentinels-"))
CASES = {c.name: c for c in hostile.hostile_cases(SENTINELS)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    sentinels = SENTINELS
    cases = CASES
    for c in cases.values():
        (root / c.filename).write_bytes(c.data)
    results = run_isolated([root / c.filename for c in cases.values()])
    time.sleep(0.5)  # a payload that spawned a process would have touched its sentinel by now
    return root, sentinels, cases, results


def _describe(r: dict) -> str:
    return json.dumps(r, indent=1)[:3000]


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_gives_checkpoint_error(corpus, name):
    root, sentinels, cases, results = corpus
    case = cases[name]
    path = root / case.filename
    r = results[str(path)]
    assert not (sentinels / f"{name}.ran").exists(), f"{name}: the payload ran"
    assert r["outcome"] == "CheckpointError", _describe(r)
    assert r["message"].startswith(f"{path}: "), r["message"]
    if case.message is not None:
        assert case.message in r["message"]


def test_no_payload_ran(corpus):
    _, sentinels, _, _ = corpus
    assert sorted(p.name for p in sentinels.iterdir()) == []


LIMIT_CASES = [
    "st-header-len-2^63",
    "st-header-100MB",
    "st-deep-nesting",
    "st-too-many-tensors",
    "st-too-many-dims",
]


@pytest.mark.parametrize("name", LIMIT_CASES)
def test_limit_errors_say_which_limit(corpus, name):
    _, _, _, results = corpus
    r = next(v for k, v in results.items() if Path(k).name.startswith(name + "."))
    assert r["type"] == "LimitError", _describe(r)
    assert "limit" in r["message"] or "deeper than" in r["message"]


# -- the payloads are real: the same bytes do run code under pickle / torch.load ----------
def _wait_for(path: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return path.exists()


@pytest.mark.parametrize("name", list(hostile.PAYLOADS))
def test_payload_runs_under_pickle_loads(tmp_path, name):
    sentinel = tmp_path / "ran"
    blob = tmp_path / "payload.pkl"
    blob.write_bytes(hostile.PAYLOADS[name](sentinel))
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())",
            str(blob),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert _wait_for(sentinel), f"{name} did not run under pickle.loads: the case tests nothing"


def test_torch_save_payloads_run_under_torch_load(tmp_path):
    cases = [c for c in hostile.hostile_cases(tmp_path) if "torch-save" in c.name]
    assert len(cases) == 6
    for c in cases:
        (tmp_path / c.filename).write_bytes(c.data)
    script = "import sys, torch\nfor f in sys.argv[1:]:\n    torch.load(f, weights_only=False)\n"
    subprocess.run(
        [sys.executable, "-c", script, *(str(tmp_path / c.filename) for c in cases)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    for c in cases:
        assert _wait_for(tmp_path / f"{c.name}.ran"), c.name


def test_zip_writer_output_loads_with_torch(tmp_path):
    """The structural zip cases mutate this layout; unmutated, torch reads it."""
    path = tmp_path / "w.pt"
    path.write_bytes(hostile.write_zip(hostile._valid_zip_layout()))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(6.0))


# -- valid fixtures open; every truncation of them is refused -------------------------------
FIXTURES = sorted(hostile.valid_fixtures())


@pytest.fixture(scope="module")
def truncations(tmp_path_factory):
    root = tmp_path_factory.mktemp("trunc")
    files: dict[str, list[Path]] = {}
    for name, blob in hostile.valid_fixtures().items():
        (root / name).write_bytes(blob)
        files[name] = []
        for cut in hostile.truncation_cut_points(len(blob)):
            p = root / f"cut{cut:06d}-{name}"
            p.write_bytes(blob[:cut])
            files[name].append(p)
    every = [root / n for n in files] + [p for ps in files.values() for p in ps]
    return root, files, run_isolated(every)


@pytest.mark.parametrize("name", FIXTURES)
def test_valid_fixture_opens(truncations, name):
    root, _, results = truncations
    r = results[str(root / name)]
    assert r["outcome"] == "ok", _describe(r)


@pytest.mark.parametrize("name", FIXTURES)
def test_truncated_fixture_gives_checkpoint_error(truncations, name):
    _, files, results = truncations
    bad = {
        p.name: results[str(p)]
        for p in files[name]
        if results[str(p)]["outcome"] != "CheckpointError"
    }
    assert not bad, _describe(bad)
    assert len(files[name]) >= 40


# -- a file that shrinks while it is being parsed -------------------------------------------
SHRINK_SCRIPT = r"""
import json, os, sys, threading
import fastckpt
path = sys.argv[1]
content = open(path, "rb").read()
outcomes = []
for i in range(8):
    with open(path, "wb") as f:
        f.write(content)
    cutter = threading.Timer(0.002 + 0.01 * i, os.truncate, (path, 4096))
    cutter.start()
    try:
        fastckpt.open(path)
        outcomes.append("ok")
    except fastckpt.CheckpointError as e:
        outcomes.append(str(e))
    cutter.join()
print(json.dumps(outcomes))
"""


def test_file_truncated_by_another_thread_while_parsing(tmp_path):
    # A 48 MB header (padding inside __metadata__) keeps the parse busy for a while;
    # the GIL is released during it, so the cutter thread truncates mid-parse.
    pad = "x" * (48 << 20)
    header = {
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "__metadata__": {"pad": pad},
    }
    path = tmp_path / "big.safetensors"
    path.write_bytes(hostile.safetensors_raw(header, b"\0" * 8))
    proc = run_python(SHRINK_SCRIPT, path)
    assert proc.returncode == 0, proc.stderr[-3000:]  # -7 would be SIGBUS
    outcomes = json.loads(proc.stdout)
    assert all(o == "ok" or o.startswith(f"{path}: ") for o in outcomes), outcomes
    assert any("while it was being read" in o for o in outcomes), outcomes


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc")
def test_file_truncated_by_another_process_while_parsing(tmp_path):
    pad = "x" * (48 << 20)
    header = {
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "__metadata__": {"pad": pad},
    }
    path = tmp_path / "big.safetensors"
    path.write_bytes(hostile.safetensors_raw(header, b"\0" * 8))
    script = (
        "import sys, subprocess, fastckpt\n"
        "subprocess.Popen([sys.executable, '-c', 'import os, sys, time; time.sleep(0.05); "
        "os.truncate(sys.argv[1], 100)', sys.argv[1]])\n"
        "try:\n    fastckpt.open(sys.argv[1]); print('ok')\n"
        "except fastckpt.CheckpointError as e:\n    print(e)\n"
    )
    proc = run_python(script, path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip()
    assert out == "ok" or out.startswith(f"{path}: "), out


USER_VIEW_SCRIPT = r"""
import faulthandler, os, sys
import fastckpt
faulthandler.enable()  # installed before fastckpt's handler: fastckpt must chain to it
path = sys.argv[1]
with fastckpt.open(path) as ckpt:
    t = ckpt.tensor("w")  # a zero-copy view of the mapping
os.truncate(path, 100)
print("sum", float(t.sum()), flush=True)  # touches pages that no longer exist
"""


def test_zero_copy_view_of_a_shrunk_file_is_still_fatal(tmp_path):
    """What remains (docs/HARDENING.md): fastckpt's handler does not swallow foreign faults.

    A user holding a zero-copy tensor of a file that shrinks gets SIGBUS, with
    faulthandler's traceback, as with torch.load(mmap=True) - never a hang or zeros.
    """
    import signal

    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(64 * 1024, dtype=torch.float32)}, str(path))  # aligned: a view
    proc = run_python(USER_VIEW_SCRIPT, path, timeout=120)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("Fatal Python error")  # faulthandler reported, no hang
    assert "sum" not in proc.stdout


# -- DeepSpeed ZeRO folders: hostile and truncated files in place of a rank's ----------------
ZERO = REPO / "tests" / "data" / "deepspeed" / "zero2"
ZERO_FILES = {
    "optim": "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "model": "global_step2/mp_rank_00_model_states.pt",
}
ZIP_CASES = [n for n, c in CASES.items() if c.reader == "torch_zip"]


@pytest.fixture(scope="module")
def zero_folders(tmp_path_factory):
    """Copies of a committed ZeRO-2 folder (tests/data/deepspeed), each with one file replaced
    by a hostile torch zip of the corpus or by a truncation of itself; opened in child
    processes like the single files."""
    import shutil

    root = tmp_path_factory.mktemp("zero")
    folders: dict[str, tuple[Path, str]] = {}
    for which, rel in ZERO_FILES.items():
        for name in ZIP_CASES:
            folders[f"{which}-{name}"] = (root / f"{which}-{name}", rel)
        blob = (ZERO / rel).read_bytes()
        for cut in hostile.truncation_cut_points(len(blob), count=12):
            folders[f"{which}-cut{cut:06d}"] = (root / f"{which}-cut{cut:06d}", rel)
    for key, (folder, rel) in folders.items():
        shutil.copytree(ZERO, folder)
        which, _, what = key.partition("-")
        if what.startswith("cut"):
            (folder / rel).write_bytes((ZERO / rel).read_bytes()[: int(what[3:])])
        else:
            (folder / rel).write_bytes(CASES[what].data)
    results = run_isolated([ZERO] + [f for f, _ in folders.values()])
    time.sleep(0.5)  # a payload that spawned a process would have touched its sentinel by now
    return folders, results


def test_zero_folder_opens(zero_folders):
    _, results = zero_folders
    r = results[str(ZERO)]
    assert r["outcome"] == "ok" and r["tensors"] == 9, _describe(r)


def test_zero_folder_with_a_hostile_or_truncated_file_gives_checkpoint_error(zero_folders):
    folders, results = zero_folders
    wrong = {}
    for key, (folder, rel) in folders.items():
        r = results[str(folder)]
        if r["outcome"] != "CheckpointError" or not r["message"].startswith(f"{folder / rel}: "):
            wrong[key] = r
    assert not wrong, _describe(wrong)
    assert len(folders) >= 2 * (len(ZIP_CASES) + 12)
    assert sorted(p.name for p in SENTINELS.iterdir()) == []
