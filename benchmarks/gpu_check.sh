#!/usr/bin/env bash
# The CUDA checks and timings, as one script for a machine with a GPU:
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# 1. the engine tests on CUDA, Triton kernels compiled (TRITON_INTERPRET=0): every backend that runs
#    on CUDA against the per-step reference in float64, the paper's networks included;
# 2. the operations and launches of a VGG9 training step at T = 20 and 100 (compiled kernels);
# 3. VGG9 and ResNet11 training and inference at T = 100, batch 16, against the per-step reference:
#    samples/s, speed ratio, torch.cuda.max_memory_allocated, and the minutes of a CIFAR-10 epoch at
#    that rate (the targets: ≥ 5× the reference; a VGG9 epoch ≤ 2 min on an H200-class GPU);
# 4. the same training steps under --amp (bf16 autocast), and one real training epoch of the script on
#    synthetic CIFAR-sized images (4,096 images, T = 100, batch 16), timed by the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0
status=0
step() { echo; echo "=== $*"; "$@" || { echo "=== FAILED ($?): $*"; status=1; }; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step timeout 420 python -m pytest -q -x tests/test_engine.py -k "cuda or launches"
step timeout 120 python benchmarks/count_ops.py --device cuda
step timeout 600 python benchmarks/bench_train.py --device cuda --models vgg9,resnet11 --rounds 3
step timeout 300 python benchmarks/bench_train.py --device cuda --models vgg9,resnet11 --modes train --amp --rounds 3 --no-memory
step timeout 300 python cifar10_VGG9.py --synthetic --device cuda --epochs 1 -b 16 --limit-train 4096 --limit-val 512 \
  -j 4 --no-progress --overwrite --out-dir runs/gpu_check_vgg9
exit $status
