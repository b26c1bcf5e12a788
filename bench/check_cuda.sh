#!/usr/bin/env bash
# The CUDA paths, on a machine with one GPU: predict.py on CUDA against the CPU (same answers?),
# analysis.py on CUDA, model.py with its default mixed precision on CUDA, and a 2-process
# torchrun (DDP over gloo) run; then the second-round training options (a diagnosis head, the
# weights' moving average, progressive resizing, a time budget) on CUDA and under torchrun, and
# their checkpoint served on CUDA against the CPU. Tiny sizes on the bundled sample: a few
# minutes. It prints figures; only a crash fails it.
#
#     bash bench/check_cuda.sh [PREPARED_SAMPLE]
#
# PREPARED_SAMPLE: prepdata.py's tree of the bundled sample, for a machine without prepdata.py's
# requirements (albumentations); without it the script prepares one.
set -euo pipefail
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
nvidia-smi --query-gpu=name --format=csv,noheader
# A checkpoint with fitted scoring rules on the bundled sample (the tests' helper).
python3 -c "
import sys; sys.path[:0] = ['tests', '.']
from pathlib import Path
from conftest import make_trusted_checkpoint
make_trusted_checkpoint(Path('$work/trusted'), image_size=128)"
for device in cpu cuda; do
  python3 predict.py sample_data/images --model "$work/trusted/best_model.pth" --device $device \
    --format json --out "$work/$device.json" --workers 4
done
python3 -c "
import json
cpu, cuda = (json.load(open(f'$work/{device}.json')) for device in ('cpu', 'cuda'))
gap = max(abs(a['probability'] - b['probability']) for a, b in zip(cpu, cuda, strict=True))
same = sum(a['label'] == b['label'] and a['reliable'] == b['reliable'] for a, b in zip(cpu, cuda))
print(f'predict.py, cpu against cuda: {len(cpu)} images, largest probability gap {gap:.2e}, '
      f'same label and flag for {same}')"
python3 analysis.py --model "$work/trusted/best_model.pth" --data "$work/trusted/prepared/val" \
  --out "$work/results" --device cuda --workers 4 | grep -E "^Scored|^Flagged"
data="$work/data"; mkdir -p "$data/test"
cp -r "$work/trusted/prepared/train" "$work/trusted/prepared/val" "$data/"
torchrun --nproc_per_node=2 model.py --data "$data" --out "$work/ddp" --weights none --image-size 64 \
  --epochs 2 --batch-size 4 --accumulation-steps 2 --device cpu --workers 0 | grep -E "^Training on|^Epoch \["
python3 model.py --data "$data" --out "$work/cuda" --weights none --image-size 64 --epochs 1 \
  --batch-size 8 --workers 2 | grep -E "^Training on|^Epoch \[|^Flagged"

tree=${1:-}
if [ -z "$tree" ]; then
  tree="$work/sample"
  python3 prepdata.py --csv sample_data/GroundTruth.csv --images sample_data/images --out "$tree" >/dev/null
fi
options=(--targets diagnosis --ema-decay 0.9 --progressive-from 48 --image-size 80 --epochs 3
  --time-budget 10 --weights none)
python3 model.py --data "$tree" --out "$work/options" "${options[@]}" --batch-size 8 --workers 2 |
  grep -E "^Training on|^Epoch \[|^Note|^ROC AUC"
python3 -c "
import torch
saved = torch.load('$work/options/best_model.pth', map_location='cpu', weights_only=False)
print('options checkpoint:', {key: saved.get(key) for key in ('targets', 'diagnoses', 'saved_weights', 'image_size')})"
for device in cpu cuda; do
  python3 predict.py "$tree/test" --model "$work/options/best_model.pth" --device $device \
    --format json --out "$work/options_$device.json" --workers 4
done
python3 -c "
import json
cpu, cuda = (json.load(open(f'$work/options_{device}.json')) for device in ('cpu', 'cuda'))
gap = max(abs(a['probability'] - b['probability']) for a, b in zip(cpu, cuda, strict=True))
print(f'diagnosis head, predict.py cpu against cuda: {len(cpu)} images, largest probability gap {gap:.2e}')"
torchrun --nproc_per_node=2 model.py --data "$tree" --out "$work/options_ddp" "${options[@]}" \
  --batch-size 4 --accumulation-steps 2 --device cpu --workers 0 | grep -E "^Training on|^Epoch \[|^ROC AUC"
