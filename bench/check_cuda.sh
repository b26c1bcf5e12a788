#!/usr/bin/env bash
# The CUDA paths, on a machine with one GPU: predict.py on CUDA against the CPU (same answers?),
# analysis.py on CUDA, model.py with its default mixed precision on CUDA, and a 2-process
# torchrun (DDP over gloo) run. Tiny sizes on the bundled sample: a few minutes. It prints
# figures; only a crash fails it.
#
#     bash bench/check_cuda.sh
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
