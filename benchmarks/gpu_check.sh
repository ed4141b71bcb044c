#!/usr/bin/env bash
# The CUDA checks and timings, as one script for a session that is lent a GPU (issue 6):
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# 1. the exactness tests on CUDA (tests/test_engine.py parametrizes over cuda when available),
# 2. the training/inference benchmark against the per-step reference (T = 100, batch 16),
# 3. one CIFAR-10-sized training epoch (50,000 synthetic images) of VGG9 and ResNet11 at T = 100,
#    batch 16 and 64, timed by the scripts themselves (the "=> epoch 1/1 ... N s" line).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q tests/test_engine.py -k cuda
python benchmarks/bench_train.py --device cuda --models lenet,vgg9,resnet11 --rounds 3
python benchmarks/bench_train.py --device cuda --models vgg9,resnet11 --modes train --amp --rounds 3 --no-memory
for script in cifar10_VGG9.py cifar10_ResNet11.py; do
  for b in 16 64; do
    python "$script" --synthetic --device cuda --epochs 1 -b "$b" --limit-train 50000 --limit-val 1000 \
      -j 4 --no-progress --out-dir "runs/gpu_${script%.py}_b$b" | grep "=> epoch 1/1"
  done
done
