#!/usr/bin/env bash
# Set up, write a small reference net as .pt2 (built here, nothing downloaded) and analyse it:
# conv sites, FLOPs, params and latency on onnxruntime and torch eager (2 threads, batch 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p runs
.venv/bin/python -m search zoo tiny_vgg --out runs/tiny_vgg.pt2
.venv/bin/python -m search analyse runs/tiny_vgg.pt2 --input-shape 3,16,16 --runtime onnxruntime,torch --threads 2 --batch 1
