#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the tests marked cuda, then the GPU bench (decode and train_speed with
# --device cuda), in one go. Logs and a copy of bench/results.json are written to $OUT (default bench/cuda_out).
#
#     bash bench/cuda.sh [python]        # python: the interpreter that has torch with CUDA (default python3)
#
# bench/README.md, "On a GPU", holds the table this produced and the GPU it ran on.
set -uo pipefail
PY=${1:-python3}
OUT=${OUT:-bench/cuda_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/machine.txt"
status=0
timeout 300 "$PY" -m pytest -q -rs -m cuda tests/test_devices.py tests/test_precision.py \
    tests/test_conformance_model.py tests/test_conformance_decoding.py 2>&1 | tee "$OUT/tests_cuda.log" || status=1
timeout 300 "$PY" bench/decode.py --device cuda --Ks 1,2,4 --bf16 --repeats 10 --repeats_b50 10 --repeats_slow 3 \
    2>&1 | tee "$OUT/decode_cuda.log" || status=1
timeout 300 "$PY" bench/train_speed.py --device cuda --precisions fp32,tf32,bf16,fp16 --iters 20 --sc_iters 10 \
    2>&1 | tee "$OUT/train_cuda.log" || status=1
timeout 300 "$PY" bench/train_speed.py --device cuda --precisions fp32,bf16 --images 50 --iters 10 --sc_iters 5 \
    2>&1 | tee "$OUT/train_cuda_b50.log" || status=1
cp bench/results.json "$OUT/results.json"
exit $status
