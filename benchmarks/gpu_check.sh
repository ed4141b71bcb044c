#!/usr/bin/env bash
# The GPU check: one short call on a machine with a CUDA GPU, with nothing to install there (the
# working tree, and the machine's torch >= 2.11, triton >= 3.6, numba, pytest):
#   bash benchmarks/gpu_check.sh             # its step timeouts add up to 300 s, kill margins included
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on a CPU at tiny sizes, Triton interpreted
# The steps, in order of value:
#   1. versions, and the GPU with its architecture;
#   2. the engine's CUDA tests, Triton kernels compiled: each backend that runs on CUDA against the
#      per-step reference in float64 (IEEE, deterministic algorithms), the paper's networks included;
#   3. VGG9 and ResNet11 at T = 100, batch 16, training step and inference against the per-step
#      reference in IEEE float32, bf16 autocast (--amp) and TF32 (--tf32): samples/s, speed ratio,
#      peak memory, CIFAR-10 epoch minutes, agreement (benchmarks/bench_gpu.py);
#   4. one short training epoch of cifar10_VGG9.py on synthetic images, timed by the script.
# A step that fails or runs out of time does not stop the next one. The full log (gpu_check.log) and
# the figures (gpu_check.json) go to $OUT if it is set, else to runs/gpu_check (a temporary folder
# for --dry-run); the summary table comes last on stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
out=${OUT:-}
[ -n "$out" ] || { [ $dry = 1 ] && out=$(mktemp -d) || out=runs/gpu_check; }
mkdir -p "$out"
log=$out/gpu_check.log
: > "$log"
KILL_AFTER=5  # a step that ignores its TERM is killed this many seconds after its timeout
py=$(command -v python3 || command -v python)  # GPU images often have python3 alone
steps=()

step() {  # step NAME SECONDS COMMAND...: the command under a timeout, logged; notes status and time
  local name=$1 limit=$2 start=$SECONDS rc status
  shift 2
  echo "=== $name (timeout $limit s): $*" | tee -a "$log"
  timeout -k $KILL_AFTER "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  status=ok
  [ "$rc" = 0 ] || status="failed ($rc)"
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && status=timeout
  steps+=("$name|$status|$((SECONDS - start))")
}

if [ $dry = 1 ]; then  # Triton's kernels in its interpreter, on CPU tensors
  export TRITON_INTERPRET=1 SPIKING_BACKEND=triton
  device=cpu
  tests=(-k "triton-cpu and (network_matches or graded or summed_spikes or odd_maps)")
  bench=(--device cpu --time-steps 2 --batch-size 1 --rounds 1 --no-warmup)
  epoch=(--device cpu --time-steps 2 --limit-train 16 --limit-val 8 -b 8 --test-batch-size 8 -j 0)
else
  export TRITON_INTERPRET=0
  device=cuda
  tests=(-k "cuda or launches")
  # Triton compiles each kernel variant on the host's CPU at first use: in parallel where pytest-xdist is
  "$py" -c "import xdist" 2>/dev/null && tests+=(-n 4)
  bench=()
  epoch=(--device cuda --limit-train 1024 --limit-val 256 -b 16 -j 4)
fi

step versions 15 "$py" - "$device" <<'EOF'
import sys, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])
if sys.argv[1] == "cuda":
    major, minor = torch.cuda.get_device_capability()
    print("gpu", torch.cuda.get_device_name(), f"sm_{major}{minor}", "memory",
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB", "cuda", torch.version.cuda,
          "torch build archs", " ".join(torch.cuda.get_arch_list()))
EOF
step "engine tests" 115 "$py" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_variants.py "${tests[@]}"
step benchmark 110 "$py" benchmarks/bench_gpu.py "${bench[@]}" --json "$out/bench.json"
step "script epoch" 40 "$py" cifar10_VGG9.py --synthetic --epochs 1 --no-progress --overwrite \
  --out-dir "$out/vgg9_epoch" "${epoch[@]}"

"$py" - "$out" "${steps[@]}" <<'EOF' | tee -a "$log"
import json, os, re, sys
out, steps = sys.argv[1], [s.split("|") for s in sys.argv[2:]]
log = open(os.path.join(out, "gpu_check.log")).read()
bench = json.load(open(os.path.join(out, "bench.json"))) if os.path.exists(os.path.join(out, "bench.json")) else {}
epoch = re.search(r"=> epoch 1/1 lr \S+ (\d+) s", log)
passed = re.search(r"^(\d+ (?:passed|failed|errors?)\b.*?)(?: in [\d.]+s.*)?$", log, re.M)
summary = dict(steps=[dict(name=n, status=s, seconds=int(t)) for n, s, t in steps],
               versions=[l for l in log.splitlines() if l.startswith(("torch ", "gpu "))],
               engine_tests=passed and passed.group(1), script_epoch_seconds=epoch and int(epoch.group(1)),
               benchmark=bench.get("rows", []), machine=bench.get("machine"))
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print("\n=== summary")
for line in summary["versions"]:
    print(line)
for s in summary["steps"]:
    print(f"{s['name']:14} {s['status']:12} {s['seconds']:4d} s")
print("engine tests:", summary["engine_tests"] or "no result")
print("script epoch (cifar10_VGG9.py, synthetic images):", f"{epoch.group(1)} s" if epoch else "no result")
if summary["benchmark"]:
    sys.path.insert(0, "benchmarks")
    from bench_gpu import HEADER, table_row
    print(HEADER)
    for r in summary["benchmark"]:
        print(table_row(r))
print(f"log and figures: {out}/gpu_check.log, {out}/gpu_check.json")
sys.exit(0 if all(s["status"] == "ok" for s in summary["steps"]) else 1)
EOF
