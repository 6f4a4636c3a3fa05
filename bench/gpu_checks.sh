#!/usr/bin/env bash
# Everything that needs a GPU, for a session that is lent one. Paste the figures (with the device
# name) into bench/RESULTS.md.
#
#   bash bench/gpu_checks.sh [tests] [kernels] [tick] [fidelity]   # default: all four
#   bash bench/gpu_checks.sh soak                          # when time is left (~2.5 min): churn under graphs
#   bash bench/gpu_checks.sh kv                            # when time is left (~6 min): the KV pool's goals, with
#                                                          # --kv-policy elastic --kv-dtype fp8 (sweep, then churn)
#
# One call runs all four within ~9.5 minutes: each step has a time limit (seconds, overridable:
# T_TESTS T_KERNELS T_TICK T_REF T_FID, 565 in all), shortened where needed so that the whole call ends
# within DEADLINE seconds (570: the device tool stops a command at 600), and a step cut short keeps
# what it measured (pytest prints its summary, bench.kernels writes each row as it comes,
# bench.tick its JSON after each batch size; bench.fidelity writes its JSON at the end). The side-by-side runs kyutai's package with its CUDA
# graphs but without its torch.compile (NO_TORCH_COMPILE=1: its compiles would not fit the step;
# REF_COMPILE=1 keeps them), which its JSON records. A lent GPU has 15 minutes of device time for
# the whole task, machine start included, so plan on one call, and rerun a single stage only if
# time is left. Works in a checkout with
# `make install` done (uses .venv) and on the device tool's bare image, whose python3 already has
# torch, triton, numpy, safetensors, sentencepiece, tqdm, pytest, einops, huggingface_hub and
# matplotlib but no network (this script ran on CPU in a venv of that image's versions: Python
# 3.12, torch 2.11, triton 3.6, numpy 2.5, huggingface_hub 1.33; tests/test_bench.py runs it on
# every CPU test run): kyutai's `moshi` (for the side-by-side and the fidelity check) travels as a wheel.
# Before the call, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl moshi==0.2.13
# and name ".whl" in the call's carry. Outputs go to $OUT when set (the device tool brings those
# back), else to bench/out.
set -uo pipefail  # a failing stage does not stop the next; the exit status says whether any failed
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TRITON_INTERPRET=0  # compiled kernels, not the CPU interpreter the CPU suite uses
export PYTHONUNBUFFERED=1
out=${OUT:-bench/out}
mkdir -p "$out"
stages=${*:-tests kernels tick fidelity}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$out/log.txt"
failed=0
deadline=$((SECONDS + ${DEADLINE:-570}))
step() {  # step SECONDS CMD...: runs CMD under a time limit (SIGINT, so it reports what it has),
          # logs it, and records a failure without stopping the rest
  local limit=$1; shift
  local left=$((deadline - SECONDS - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 0 ]; then echo "SKIPPED (no time left): $*" | tee -a "$out/log.txt"; failed=1; return; fi
  timeout --signal=INT --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
  local status=${PIPESTATUS[0]}
  [ "$status" -ne 124 ] || echo "TIME LIMIT (${limit}s): $*" | tee -a "$out/log.txt"
  [ "$status" -eq 0 ] || { echo "FAILED ($status): $*" | tee -a "$out/log.txt"; failed=1; }
}
for stage in $stages; do
  case $stage in
    tests)  # kernels in bf16 on the GPU, and the CUDA-graph step against the eager one
      step "${T_TESTS:-170}" $PY -m pytest -p no:cacheprovider tests/test_kernels_cuda.py tests/test_graphs.py ;;
    kernels)  # each kernel against its torch path at Moshi 7B shapes
      step "${T_KERNELS:-110}" $PY -m bench.kernels --json "$out/kernels.json" ;;
    tick)
      # The 7B sweep at full context. KV is preallocated at full context (~1.6 GB a slot in bf16),
      # so the engine alone fits ~38 slots on 80 GB; the reference allocates its own caches beside
      # it, hence its smaller, separate sweep.
      # The goals' two figures (B=1, B=32) first, should the time limit cut the sweep short. A card
      # with more memory than an H100's 80 GB (an H200: 141 GB) also holds 64 and 48 such slots:
      # 64, its capacity, right after them.
      mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
      big=""; more=""; [ "${mib:-0}" -ge 120000 ] 2>/dev/null && { big=64; more=48; }
      step "${T_TICK:-140}" $PY -m bench.tick --dummy 7b --device cuda --dtype bfloat16 --batch 1 32 $big 8 16 24 $more \
          --full-context --no-reference --warmup 3 --ticks 20 --output "$out/tick-7b-full"
      if $PY -c "import moshi" 2>/dev/null; then
        compile=1; [ "${REF_COMPILE:-0}" = 1 ] && compile=""
        step "${T_REF:-70}" env ${compile:+NO_TORCH_COMPILE=1} $PY -m bench.tick --dummy 7b --device cuda --dtype bfloat16 \
            --batch 1 4 8 --warmup 3 --ticks 20 --output "$out/tick-7b-vs-reference"
      else
        echo "moshi is not importable: skipping the side-by-side (carry its wheel, see the header)" | tee -a "$out/log.txt"
      fi ;;
    fidelity)
      # lockstep in bf16 as a GPU serves it (Triton kernels, the LM step in a CUDA graph) beside kyutai's
      # bf16, both teacher-forced against kyutai's fp32 (docs/precision.md); on the `small` random
      # checkpoint (the 7B one takes minutes to write) and 3 x 8 s of synthetic speech. Exit 1: the
      # goal (lockstep/reference KL ratio <= 1.1, top-1 within 0.5 points) was missed.
      if $PY -c "import moshi" 2>/dev/null; then
        ins=${TMPDIR:-/tmp}/lockstep-fidelity-inputs
        $PY -m bench.fidelity_inputs "$ins" --count 3 --seconds 8 >>"$out/log.txt" 2>&1
        step "${T_FID:-75}" $PY -m bench.fidelity --dummy small --device cuda --dtype bfloat16 --kernels triton \
            --json "$out/fidelity-bf16.json" "$ins"/speech-0.wav "$ins"/speech-1.wav "$ins"/speech-2.wav
      else
        echo "moshi is not importable: skipping the fidelity check (carry its wheel, see the header)" | tee -a "$out/log.txt"
      fi ;;
    soak)  # callers churning through CUDA graphs: no memory growth, witnesses' tokens exact
      ck=${TMPDIR:-/tmp}/lockstep-soak-ck
      [ -f "$ck/config.json" ] || $PY -m engine.cli make-checkpoint "$ck" --preset tiny 2>&1 | tee -a "$out/log.txt"
      step "${T_SOAK:-150}" $PY -m bench.soak --model-dir "$ck" --device cuda --max-sessions 8 --ticks 800 \
          --output "$out/soak.json" ;;
    kv)  # elastic pages in fp8: the 7B sweep past what reserve holds (goal: >= 96 sessions at p99 < 80 ms),
         # every slot as deep in its call as the pool lets it grow (the worst case: the pool runs dry and
         # windows are capped), then callers churning through a pool made tiny on purpose
      step "${T_KV:-240}" $PY -m bench.tick --dummy 7b --device cuda --dtype bfloat16 --kv-policy elastic \
          --kv-dtype fp8 --batch 96 128 64 32 --full-context --no-reference --warmup 3 --ticks 20 \
          --output "$out/tick-7b-elastic-fp8"
      ck=${TMPDIR:-/tmp}/lockstep-soak-ctx80
      [ -f "$ck/config.json" ] || $PY -m engine.cli make-checkpoint "$ck" --preset tiny --context 80 --mimi-context 5 \
          2>&1 | tee -a "$out/log.txt"
      step "${T_SOAK_KV:-120}" $PY -m bench.soak --model-dir "$ck" --device cuda --max-sessions 8 --ticks 600 \
          --kv-policy elastic --kv-dtype fp8 --kv-pages 60 --kv-page-size 4 --kv-min-seconds 3.2 \
          --output "$out/soak-elastic-fp8.json" ;;
    *) echo "unknown stage $stage (tests, kernels, tick, fidelity, soak, kv)"; exit 2 ;;
  esac
done
exit $failed
