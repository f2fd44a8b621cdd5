#!/usr/bin/env bash
# CUDA check and GPU throughput, in one run on a machine with a GPU (a few minutes on an H100).
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. the whole pipeline on CUDA at the paper's sizes: phantoms -> prepare -> MAE pretraining of a
#    ViT-B/16 on 96^3 crops (bf16) -> UNETR fine-tuning from it -> predict -> evaluate;
#    the runs' metrics.csv give steps/s and the share of time spent waiting for data;
# 2. benchmarks/bench_train.py on CUDA: medmim vs MONAI steps, MFU against the card's measured bf16 peak.
# Expects medmim importable (pip install -e . or PYTHONPATH=src) and MONAI, nibabel, pydantic present.
set -u -o pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
W=${GPU_CHECK_WORK:-/tmp/medmim-gpu-check}
rm -rf "$W"
mkdir -p "$W"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MEDMIM_CACHE="$W/cache"
STEPS_PRE=${STEPS_PRE:-150}
STEPS_FT=${STEPS_FT:-150}
t0=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, torch.cuda.get_device_name())"

stage "phantoms + prepare"
$PY -m medmim data phantom "$W/ph" --labeled 8 --unlabeled 8 --seed 0 || exit 1
$PY -m medmim data prepare "$W/ph" --out "$W/ph-cache" --workers 8 || exit 1

stage "MAE pretraining, ViT-B/16, 96^3, bf16, $STEPS_PRE steps"
$PY -m medmim pretrain mae-vitb16 data.path="$W/ph-cache" run.dir="$W/mae" run.device=cuda \
    data.num_workers=6 data.batch_size=4 train.max_steps=$STEPS_PRE train.warmup_steps=10 train.log_every=10 || exit 1
cp "$W/mae/metrics.csv" "$OUT/mae-metrics.csv"

stage "UNETR fine-tuning from it, bf16, $STEPS_FT steps"
$PY -m medmim finetune unetr-vitb16 data.path="$W/ph-cache" run.dir="$W/unetr" run.device=cuda \
    model.pretrained="$W/mae/checkpoints/last.pt" data.num_workers=6 train.max_steps=$STEPS_FT \
    train.warmup_steps=10 train.log_every=10 train.val_every=$STEPS_FT || exit 1
cp "$W/unetr/metrics.csv" "$OUT/unetr-metrics.csv"

stage "predict + evaluate on CUDA (bf16)"
CK="$W/unetr/checkpoints/best.pt"
[ -f "$CK" ] || CK="$W/unetr/checkpoints/last.pt"
$PY -m medmim predict -c "$CK" "$W/ph/imagesTr/$(ls "$W/ph/imagesTr" | head -1)" -o "$W/pred" --device cuda \
    --precision bf16 || exit 1
$PY -m medmim evaluate -c "$CK" -d "$W/ph" --split val -o "$W/eval" --device cuda --precision bf16 || exit 1
cp "$W/eval/metrics.md" "$OUT/eval-metrics.md" 2>/dev/null

stage "bench_train.py on CUDA (paper configuration)"
$PY benchmarks/bench_train.py --device cuda --configs paper --out "$OUT" --name train-cuda || exit 1
stage "done"
