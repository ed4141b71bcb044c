"""Side-by-side timing and peak memory of two implementations, for the benchmarks here.

Speed: the two are run alternately, round after round, so that machine noise hits both alike; the
median per round is reported. Engine and per-step reference each run in a process of their own
(`alternate_processes`), with the process settings of `ENV`: ours as our scripts set them (see
utils.py), the same for the reference except passive OpenMP waits, which slow the authors'
per-step loop, a stream of small parallel ops (docs/performance.md). Peak memory: each implementation is
measured alone in a fresh process (RSS growth on a CPU, torch.cuda.max_memory_allocated on a
GPU), since a process never gives freed memory back to RSS and would hide the second one's peak."""
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import utils  # noqa: E402  (after torch: it then changes nothing in this process, only names the settings)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns, rounds, device):
    """{name: median seconds per call}, calling each fn once per round, in turn, in this process."""
    for fn in fns.values():  # warm-up: compilation, allocator, caches
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


# Process settings per implementation: ours as utils.py sets them for our scripts (glibc's by its
# environment variables here, the equivalent of utils.py's mallopt calls). The reference gets the
# same, except libgomp's default spinning, with which its stream of small parallel ops runs faster.
GLIBC_KEEPS_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(utils.MMAP_THRESHOLD),
                            "MALLOC_TRIM_THRESHOLD_": str(utils.TRIM_THRESHOLD)}
OURS = {**utils.TORCH_SETTINGS, **GLIBC_KEEPS_FREED_MEMORY}
ENV = {"engine": OURS, "reference": {k: v for k, v in OURS.items() if k != "OMP_WAIT_POLICY"}}


def worker_env(impl):
    env = {k: v for k, v in os.environ.items() if k not in OURS}
    return {**env, **ENV[impl]}


def run_as(impl):
    """Re-run this script with `impl`'s process settings unless it has them already (torch reads
    them when it loads, so they cannot be changed in a running process)."""
    if any(os.environ.get(k) != v for k, v in ENV[impl].items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], worker_env(impl))


class Worker:
    """`script --worker IMPL ARGS...` in a process of its own: it builds its step, warms it up,
    then times one call per request (see `serve`)."""

    def __init__(self, script, impl, args):
        self.proc = subprocess.Popen([sys.executable, script, "--worker", impl, *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=worker_env(impl))
        self.answer()  # ready: warmed up

    def answer(self):
        for line in self.proc.stdout:  # skip anything else the worker printed
            if line.startswith(ANSWER):
                return float(line[len(ANSWER):])
        raise RuntimeError(f"benchmark worker {self.proc.args[2:4]} exited with {self.proc.wait()}")

    def time(self):
        self.proc.stdin.write("time\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


ANSWER = "seconds="


def serve(fn, device):
    """The worker's side: warm fn up, then call it once per line on stdin, printing the seconds."""
    for _ in range(2):  # the second call still grows the heap: its page faults are not a step's cost
        fn()
    print(f"{ANSWER}0", flush=True)
    for _ in sys.stdin:
        print(f"{ANSWER}{timed(fn, device)!r}", flush=True)


def alternate_processes(script, args, impls, rounds):
    """{impl: median seconds per call}, each impl in its own worker process (started one after
    the other, so warm-ups do not overlap), called once per round, in turn."""
    workers = {}
    try:
        for impl in impls:
            workers[impl] = Worker(script, impl, args)
        times = {impl: [] for impl in impls}
        for _ in range(rounds):
            for impl, worker in workers.items():
                times[impl].append(worker.time())
    finally:
        for worker in workers.values():
            worker.close()
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def rss_bytes(field="VmRSS"):
    """Resident memory now (VmRSS) or at its peak (VmHWM). Not getrusage's ru_maxrss: Linux
    carries it across exec, so a worker would inherit its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def peak_memory(fn, device, warmup, calls=2):
    """Peak memory growth (bytes) while calling fn, in this fresh process. `warmup` runs the same
    code on a tiny input first, so JIT compilation is not counted; a full-size warm-up would
    be, wrongly, since the allocator would then serve the measured calls from memory it kept."""
    warmup()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    base = rss_bytes()
    for _ in range(calls):
        fn()
    return rss_bytes("VmHWM") - base


def measure_in_subprocess(script, impl, args):
    """Run `script --memory-worker IMPL ARGS...` in a fresh process; returns the bytes it prints."""
    out = subprocess.run([sys.executable, script, "--memory-worker", impl, *args], capture_output=True,
                         text=True, check=True, env=worker_env(impl))
    return int(out.stdout.strip().splitlines()[-1])


def fmt_bytes(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def report(rows, as_json):
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


class Rows:
    """Benchmark results: printed one per line as they come, or as one JSON list at the end;
    either way followed by the machine they ran on."""

    def __init__(self, as_json):
        self.as_json, self.rows = as_json, []

    def add(self, row):
        self.rows.append(row)
        if not self.as_json:
            report([row], False)

    def finish(self):
        if self.as_json:
            report([dict(machine=machine())] + self.rows, True)
        else:
            print("machine:", machine())


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu,
                env=ENV,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                load=os.getloadavg()[0])
