#!/usr/bin/env bash
# Issue 3's GPU checks as one short command for a lent GPU machine (the workplace's
# `device` tool): build there, run the CUDA tests, run `fastckpt bench --device cuda`.
# Prepared without a GPU: no session has been lent one yet, so it has never run.
#
# The GPU image has torch, pybind11, scikit-build-core, cmake and ninja; the one
# build requirement it lacks is nlohmann-json, carried as a wheel. Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl nlohmann-json==3.12.0
# Then: device run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540).
# What lands in $OUT comes back: gpu.txt, build.log, tests.log, bench.json, bench.err.
set -uo pipefail
out=${OUT:-/tmp/fastckpt-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  || { echo "no .whl/nlohmann-json wheel carried"; exit 1; }
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())" >> "$out/gpu.txt" 2>&1
FASTCKPT_WERROR=OFF python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/build.log" 2>&1 \
  || { tail -n 30 "$out/build.log"; exit 1; }

# The CUDA tests (skipped without a GPU elsewhere) and the sink against the stand-in runtime.
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_load_cuda.py tests/test_cuda_sink_fake.py \
  > "$out/tests.log" 2>&1
echo "tests: exit $?"; tail -n 5 "$out/tests.log"

# Peers side by side, destinations on the GPU, with the pinned host-to-device ceiling.
timeout 300 python3 -c "import sys; from fastckpt.cli.app import main; sys.argv[0] = 'fastckpt'; main()" \
  bench --device cuda --repeat 3 --json --cache-dir /tmp/fastckpt-bench > "$out/bench.json" 2> "$out/bench.err"
echo "bench: exit $?"; tail -n 5 "$out/bench.err"
