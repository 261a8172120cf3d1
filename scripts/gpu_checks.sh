#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script (about 8 minutes on one H200): the gpu-marked tests (4/8-bit
# and FP8 loading; ZeRO-2, ZeRO-3, ZeRO-3 offload and FSDP saving an adapter that evaluates like DDP's) and the
# MFU levers of bench/gpu_bench.py (answer-only logits, fused loss, gradient checkpointing off).
#
#     bash scripts/gpu_checks.sh [OUT_DIR]
#
# On a machine without internet access, first fetch the packages on one that has it and carry the folder:
#     PYTHON=.venv/bin/python bash scripts/gpu_checks.sh --fetch .whl   (deepspeed, liger-kernel, bitsandbytes, xgrammar, and the
#                                                   transformers/peft versions this project is tested with)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--fetch" ]; then
    DEST=${2:-.whl}
    mkdir -p "$DEST"
    # deepspeed ships as a source archive: build its pure-Python wheel here (ops compile on first use there).
    DS_BUILD_OPS=0 "$PY" -m pip wheel --no-deps --no-build-isolation -w "$DEST" "deepspeed==0.19.8" || exit
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
        -d "$DEST" liger-kernel "bitsandbytes>=0.45" "xgrammar>=0.1.20" hjson ninja py-cpuinfo msgpack \
        "transformers==5.24.0" "peft==0.21.2" || exit
    exit 0
fi
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
if [ -d .whl ]; then  # carried wheels (see --fetch)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__)" | tee -a "$OUT/gpu.txt"
timeout 420 "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider tests/ 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 240 "$PY" bench/gpu_bench.py --levers --steps 3 --json "$OUT/levers.json" 2>&1 | tee "$OUT/levers.log"
