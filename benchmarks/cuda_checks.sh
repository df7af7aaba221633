#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the static model with CUDA graphs against the dynamic
# paths and torchvision's FCOS / Faster R-CNN, the CUDA tests, inference speed of the plain and fast
# paths (end to end and per stage), host-device synchronisations per stage, torch.compile, and a short
# mixed-precision (fp16 + grad scaler) training run of the demo on the GPU.
#
#     bash benchmarks/cuda_checks.sh [OUTPUT_DIR]      (default runs/cuda_checks)
#     CKPT=runs/demo/best.pth bash benchmarks/cuda_checks.sh   (also: AP of fp16/bf16 on that checkpoint)
#
# Works from a source checkout without installation (PYTHONPATH=src). Each step has its own time limit,
# cut to what is left of BUDGET seconds (default one hour) for the whole script; the most important
# steps come first.
set -u -o pipefail
OUT_DIR=${1:-runs/cuda_checks}
mkdir -p "$OUT_DIR"
export PYTHONPATH="src:benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-3600}
step() { echo; echo "=== $1 ($(date +%T), ${SECONDS}s in)"; }
# limit SECONDS: the smaller of SECONDS and what is left of the budget (at least 1)
limit() { local left=$((BUDGET - SECONDS)); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"

step "static model + CUDA graphs vs --fast, plain, FCOS and Faster R-CNN (batch 1 and 4), static syncs"
timeout $(limit 300) $PY benchmarks/deployment_gpu.py --batch-sizes 1 4 --repeats 30 --warmup 5 2>&1 \
    | tee "$OUT_DIR/deployment_gpu.log"

step "host-device synchronisations per stage"
timeout $(limit 120) $PY benchmarks/cuda_syncs.py 2>&1 | tee "$OUT_DIR/syncs.log"

if [ -n "${CKPT:-}" ]; then
    step "AP and detection differences of the precision settings on $CKPT"
    timeout $(limit 240) $PY benchmarks/precision_accuracy.py "$CKPT" --device cuda \
        --settings plain fp16 bf16 fast fast_fp16 fast_bf16 2>&1 | tee "$OUT_DIR/precision.log"
fi

step "inference speed, end to end (no stage hooks)"
timeout $(limit 180) $PY benchmarks/inference_speed.py --device cuda --batch-sizes 1 4 --repeats 30 --warmup 5 \
    --no-stage-hooks 2>&1 | tee "$OUT_DIR/speed.log"

step "inference speed, per stage (hooks synchronise at each stage)"
timeout $(limit 90) $PY benchmarks/inference_speed.py --device cuda --batch-sizes 1 --repeats 20 --warmup 3 \
    --settings plain fast 2>&1 | tee "$OUT_DIR/stages.log"

step "CUDA tests"
timeout $(limit 150) $PY -m pytest tests -q -p no:cacheprovider -o addopts="" -k "cuda" 2>&1 | tee "$OUT_DIR/pytest_cuda.log" | tail -15

step "demo training on the GPU with fp16 autocast and a grad scaler"
timeout $(limit 240) $PY -m asag demo --output-dir "$OUT_DIR/demo" runtime.device=cuda runtime.amp=fp16 \
    2>&1 | tee "$OUT_DIR/demo.log" | tail -25

step "torch.compile"
timeout $(limit 180) $PY benchmarks/inference_speed.py --device cuda --models ASAG-A --batch-sizes 1 --repeats 20 \
    --warmup 3 --no-stage-hooks --settings plain fast fast_compile 2>&1 | tee "$OUT_DIR/compile.log"
