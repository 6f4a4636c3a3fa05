#!/usr/bin/env bash
# Everything that needs a GPU, in one go, for a session that has one. Run from the repository root
# after `make install`; paste the figures (with the device name) into bench/RESULTS.md.
set -euo pipefail
PY=${PY:-.venv/bin/python}
export TRITON_INTERPRET=0  # compiled kernels, not the CPU interpreter the CPU suite uses
mkdir -p bench/out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee bench/out/device.txt
# Kernels in bf16 on the GPU, and the CUDA-graph step against the eager one.
$PY -m pytest -q -p no:warnings tests/test_kernels_cuda.py tests/test_graphs.py
# Each kernel against its torch path at Moshi 7B shapes.
$PY -m bench.kernels | tee bench/out/kernels.txt
# The 7B tick sweep. KV is preallocated at full context (~1.6 GB a slot in bf16), so the engine alone
# fits ~38 slots on 80 GB; the reference allocates its own caches, hence its smaller sweep.
$PY -m bench.tick --dummy 7b --device cuda --dtype bfloat16 --batch 1 8 16 24 32 --full-context --no-reference \
    --output bench/out/tick-7b-full | tee bench/out/tick-7b-full.txt
$PY -m bench.tick --dummy 7b --device cuda --dtype bfloat16 --batch 1 4 8 \
    --output bench/out/tick-7b-vs-reference | tee bench/out/tick-7b-vs-reference.txt
