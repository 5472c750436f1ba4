#!/usr/bin/env bash
# `import fastckpt` on top of torch, per fresh interpreter: CPU ms and wall ms, sorted by
# CPU. Usage: bench/import_time.sh [PYTHON ...] (default: this tree's .venv/bin/python).
# Bytecode on, cached apart per interpreter (the project's shell sets
# PYTHONDONTWRITEBYTECODE=1, which would time the compiler instead); N runs each (9).
unset PYTHONDONTWRITEBYTECODE
pythons=("$@")
[ ${#pythons[@]} -eq 0 ] && pythons=(.venv/bin/python)
for py in "${pythons[@]}"; do
  prefix=/tmp/fastckpt-pyc-$(echo "$py" | md5sum | cut -c1-8)
  PYTHONPYCACHEPREFIX=$prefix "$py" -c "import torch, fastckpt" # warm: write the bytecode
done
for i in $(seq 1 "${N:-9}"); do
  for py in "${pythons[@]}"; do
    prefix=/tmp/fastckpt-pyc-$(echo "$py" | md5sum | cut -c1-8)
    PYTHONPYCACHEPREFIX=$prefix "$py" -c "
import time, torch
c, w = time.process_time(), time.perf_counter()
import fastckpt
print('$py', round((time.process_time() - c) * 1e3, 1), round((time.perf_counter() - w) * 1e3, 1))"
  done
done | sort -k1,1 -k2n | awk '{c[$1]=c[$1]" "$2; w[$1]=w[$1]" "$3}
  END {for (k in c) print k, "cpu ms:" c[k], "| wall ms:" w[k]}'
