#!/usr/bin/env bash
# The GPU checklist, one run on a CUDA machine (about 8 minutes on one H200), most important first:
#   1. the CUDA tests (pytest -k cuda: post-processing, predictor with TTA and bf16, training at every precision
#      with an exact-path resume),
#   2. distributed training steps with NCCL + SyncBatchNorm + bf16 (torchrun, two processes: on one GPU both
#      share cuda:0, which NCCL may refuse; then the message is the finding),
#   3. the demo on CUDA (train, evaluate, predict and draw: PQ and time),
#   4. benchmarks: training throughput fp32/bf16, post-processing on the GPU, end-to-end inference (eager,
#      channels_last, bf16, torch.compile).
#
#   bash benchmarks/gpu_checklist.sh [WORK_DIR]
#
# Python: $PYTHON (default python3) with this project's dependencies (`make install` and .venv/bin/python, or a
# machine's own torch with the rest on PYTHONPATH); the checkout's src/ goes first on PYTHONPATH. Each step runs
# under its own time limit; a summary of exit codes and seconds ends the output.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${1:-$(mktemp -d)}
mkdir -p "$WORK"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    echo -e "\n===== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" 2>&1
    rc=$?
    SUMMARY+=("$name: exit $rc, $(( $(date +%s) - start )) s")
    echo "===== $name: exit $rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY - <<'EOF'
import numba, onnxruntime, timm, torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, NCCL {torch.cuda.nccl.version()}), timm {timm.__version__}, "
      f"numba {numba.__version__}, onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
print(f"{torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}; {torch.get_num_threads()} CPU threads")
EOF

step cuda-tests 150 $PY -m pytest -q -p no:cacheprovider -rs -k cuda tests

DATA="$WORK/data"
$PY - "$DATA" <<'EOF'
import sys
from panoptic_deeplab.data.synthetic import make_synthetic_dataset
make_synthetic_dataset(sys.argv[1], "train", 32, (128, 256), seed=0)
make_synthetic_dataset(sys.argv[1], "val", 8, (128, 256), seed=1)
EOF
DATA_OVERRIDES=()
for split in train val; do
    DATA_OVERRIDES+=("data.$split.images=$DATA/$split/images" "data.$split.json=$DATA/$split/panoptic_$split.json"
                     "data.$split.panoptic=$DATA/$split/panoptic")
done
step nccl-syncbn-bf16 90 $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m panoptic_deeplab.cli train \
    --config synthetic_mnv3 --output-dir "$WORK/ddp" "${DATA_OVERRIDES[@]}" train.device=cuda:0 solver.amp=bf16 \
    solver.max_iter=6 train.checkpoint_period=6 train.eval_period=6 train.log_period=2 data.num_workers=2

step demo-cuda 150 $PY -m panoptic_deeplab.cli demo --output-dir "$WORK/demo" --no-progress train.device=cuda \
    data.num_workers=8

step bench-train 90 $PY benchmarks/bench_train.py --device cuda --steps 40 --warmup 10 data.num_workers=8
step bench-postprocess 90 $PY benchmarks/bench_postprocess.py --cuda --centers 200 --threads 16 --naive-repeat 1
step bench-inference 100 $PY benchmarks/bench_inference.py --device cuda --repeats 5
step bench-inference-compile 150 $PY benchmarks/bench_inference.py --device cuda --repeats 5 --compile \
    --presets cityscapes_mnv3

echo -e "\n===== summary"
printf '%s\n' "${SUMMARY[@]}"
