#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the tests marked cuda, then the GPU bench (--cuda_graphs 1 against eager with
# bench/cuda_graphs.py; decode and train_speed with --device cuda), in one go of about 6 minutes (plus up to 5 for
# the --compile 1 step). Logs and a copy of bench/results.json (refreshed after each step) are written to $OUT
# (default bench/cuda_out).
#
#     bash bench/cuda.sh [python]        # python: the interpreter that has torch with CUDA (default python3)
#
# bench/README.md, "On a GPU", holds the tables this produced and the GPU it ran on.
set -uo pipefail
PY=${1:-python3}
OUT=${OUT:-bench/cuda_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

step() {  # step LOG SECONDS ARGS...: run "$PY ARGS" under a time limit, tee its output to $OUT/LOG
    local log=$1 limit=$2
    shift 2
    echo "== $*" | tee "$OUT/$log"
    timeout "$limit" "$PY" "$@" 2>&1 | tee -a "$OUT/$log" || status=1
    cp bench/results.json "$OUT/results.json" 2>/dev/null
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"
step tests_cuda.log 120 -m pytest -q -rs -m cuda tests/test_devices.py tests/test_precision.py \
    tests/test_conformance_model.py tests/test_conformance_decoding.py tests/test_cuda_graphs.py
step cuda_graphs.log 180 bench/cuda_graphs.py --device cuda --repeats 10
step decode_cuda.log 120 bench/decode.py --device cuda --Ks 1,2,4 --bf16 --repeats 10 --repeats_b50 10 --repeats_slow 3
step train_cuda.log 90 bench/train_speed.py --device cuda --precisions fp32,tf32,bf16,fp16 --iters 20 --sc_iters 10
step train_cuda_b50.log 60 bench/train_speed.py --device cuda --precisions fp32,bf16 --images 50 --iters 10 --sc_iters 5
step train_cuda_compiled.log 300 bench/train_speed.py --device cuda --precisions fp32,bf16 --compile 1 --iters 10 \
    --sc_iters 5
exit $status
