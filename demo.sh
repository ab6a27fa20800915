#!/usr/bin/env bash
# The whole pipeline on embedded defaults, a few minutes on 2 CPU cores: synthetic data, both variants
# trained with the tiny RANDOM backbone, evaluation, comparison and attention analysis, then the zero-shot
# protocol (both directions, 2 seeds) on synthetic stand-ins.
# Random weights: the numbers only show that everything runs.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${DEMO_OUT:-ckpt/demo}
rm -rf "$OUT"
python -m dataset.synthetic --out data/Synthetic --metadata_dir dataset/metadata --name Synthetic --shots 4
COMMON=(--model tiny --pretrained none --image_size 112 --dataset Synthetic --shot 4
        --text_epoch 3 --image_epoch 3 --text_batch_size 4 --image_batch_size 2 --num_workers 0)
python train.py "${COMMON[@]}" --save_path "$OUT/baseline"
python train_cross_attention.py "${COMMON[@]}" --save_path "$OUT/cross_attention" --sanity_check
for run in baseline cross_attention; do
  python test.py --save_path "$OUT/$run" --dataset Synthetic --num_workers 0 --visualize
done
python compare.py "$OUT/baseline" "$OUT/cross_attention" --dataset Synthetic --out "$OUT/compare_Synthetic"
python analyze_attention.py --save_path "$OUT/cross_attention" --dataset Synthetic --num_images 2 --num_workers 0
# Test sets cut to one industrial and one medical set to keep it near a minute and a half; every set of the
# protocol: drop --industrial and --medical (about 5 minutes).
python protocol.py --stand_ins --seeds 1 2 --industrial MVTec --medical Brain --cpu_jobs 2 --out "$OUT/protocol"
