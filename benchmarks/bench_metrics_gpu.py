"""`modeaudit metrics` at large sizes on one GPU, timed as a user runs it, with the device's own GEMM floor.

    python benchmarks/bench_metrics_gpu.py --sizes 1e5,1e6 --dim 128 --budget-s 420 --json out.json
    python benchmarks/bench_metrics_gpu.py --device cpu --quick            # the harness itself, any machine

For each size n (both sets n rows of `dim` float32 columns; real ~ N(0, I) from seed 1, fake ~
N(0, I) + 0.1 from seed 2, as benchmarks/bench_metrics.py draws them):

* writes real.npy / fake.npy under --work and runs the CLI in a fresh process,
  `python -m modeaudit.flows.cli metrics --real real.npy --fake fake.npy --k K --out DIR --kernel KERNEL`
  (default kernel auto: torch-cuda on a GPU machine), timing its wall clock, polling the
  device's used memory (nvidia-smi, every 0.2 s; the run's share is the peak less what was in
  use just before it, this harness's own CUDA context) and reading the process's peak RSS;
* a tiny run first (2000 rows) measures the fixed cost of a run (interpreter, imports,
  numba's compilation or cache load, the CUDA context): "fixed_s", reported beside each size;
* the GEMM floor: a bare float32 torch.mm over the pairs the metrics form at least once
  (R R^T, F F^T, R F^T: 3 n^2 scores, as bench_metrics.py counts them), slabs resident on
  the device, synchronised. ratio = (wall - fixed) / floor.

A size whose time, projected from the previous one as (wall - fixed) (n / n_prev)^2 + fixed,
exceeds what is left of --budget-s is skipped and says so (the projection is printed). The
largest size's metrics.json is kept in the JSON so runs on other machines can be compared
key for key. Benchmarks are not tests: tests/test_bench_metrics_gpu.py runs this harness on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

def _data(n: int, d: int):
    real = np.random.default_rng(1).standard_normal((n, d), dtype=np.float32)
    fake = np.random.default_rng(2).standard_normal((n, d), dtype=np.float32)
    fake += np.float32(0.1)
    return real, fake


def _device_memory_used() -> int | None:
    """Device memory in use now (MiB, every process on the busiest GPU) per nvidia-smi; None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
        return max(int(x) for x in out.split())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


class _GpuMemoryPoll:
    """Peak device memory in use (MiB, all processes) while a run lasts, and what was in use just before it
    (this harness's own CUDA context and cache): the run's own share is the difference. None without nvidia-smi."""

    def __init__(self, enabled: bool):
        self.peak = self.baseline = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True) if enabled and shutil.which("nvidia-smi") else None

    def _loop(self):
        while not self._stop.is_set():
            used = _device_memory_used()
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            self._stop.wait(0.2)

    def __enter__(self):
        if self._t:
            self.baseline = _device_memory_used()
            self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._t:
            self._t.join()


def run_cli(n: int, d: int, k: int, kernel: str, work: str, timeout: float, gpu: bool) -> dict:
    """Write the two sets and time one `modeaudit metrics` run on them in a fresh process."""
    real, fake = _data(n, d)
    rp, fp, out = (os.path.join(work, f"{name}_{n}.npy") for name in ("real", "fake", "out"))
    out = os.path.join(work, f"out_{n}")
    np.save(rp, real)
    np.save(fp, fake)
    del real, fake
    cmd = [sys.executable, "-m", "modeaudit.flows.cli", "metrics", "--real", rp, "--fake", fp, "--k", str(k),
           "--out", out, "--kernel", kernel]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with _GpuMemoryPoll(gpu) as poll:
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"n": n, "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t}
        wall = time.perf_counter() - t
    res = {"n": n, "d": d, "k": k, "kernel": kernel, "wall_s": wall, "command": " ".join(cmd),
           "gpu_memory_peak_mib": poll.peak, "gpu_memory_baseline_mib": poll.baseline,
           "gpu_memory_run_mib": None if poll.peak is None or poll.baseline is None else poll.peak - poll.baseline}
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: exact for the first and for any larger run.
    res["peak_rss_gib"] = max(before, after) / 2**20
    if p.returncode != 0:
        res["error"] = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
        return res
    with open(os.path.join(out, "metrics.json")) as f:
        res["metrics"] = json.load(f)
    for path in (rp, fp):
        os.remove(path)
    return res


def gemm_floor(n: int, d: int, device: str, slab: int = 8192, cols: int = 1 << 17) -> dict:
    """Seconds of bare float32 torch.mm over R R^T, F F^T and R F^T (3 n^2 scores) on the device."""
    import torch
    dev = torch.device(device)
    real, fake = _data(n, d)
    R, F = torch.from_numpy(real).to(dev), torch.from_numpy(fake).to(dev)
    del real, fake
    buf = torch.empty((slab, min(n, cols)), dtype=torch.float32, device=dev)

    def once():
        for a, b in ((R, R), (F, F), (R, F)):
            for c0 in range(0, n, cols):
                bt = b[c0:c0 + cols].T
                for r0 in range(0, n, slab):
                    at = a[r0:r0 + slab]
                    torch.mm(at, bt, out=buf[:at.shape[0], :bt.shape[1]])
        if dev.type == "cuda":
            torch.cuda.synchronize()

    torch.mm(R[:slab], R[:slab].T)   # warm-up: cuBLAS's heuristics and workspace
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    once()
    s = time.perf_counter() - t
    del R, F, buf
    if dev.type == "cuda":
        torch.cuda.empty_cache()     # else the next size's run would be measured with these cached blocks in use
    return {"seconds": s, "scores": 3 * n * n, "tflops": 2.0 * 3 * n * n * d / s / 1e12,
            "tf32": bool(dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)}


def projected_s(prev: dict, fixed_s: float, n: int) -> float:
    """Seconds a run of n rows should take, from a finished run `prev` of prev["n"] rows: pairs grow as n^2."""
    return (prev["wall_s"] - fixed_s) * (n / prev["n"]) ** 2 + fixed_s


def main(argv=None) -> dict:
    """Run the benchmark; print one line per size and return (and optionally write) the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--sizes", default="1e5,1e6")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--kernel", default=None, help="the CLI's --kernel (default: auto on cuda, torch-cpu on cpu)")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="skip a size projected past this total")
    ap.add_argument("--work", default=None, help="folder for the .npy files and outputs (default: a temporary one)")
    ap.add_argument("--fixed-s", type=float, default=None, help="the fixed cost of a run, in seconds, instead of "
                    "timing a tiny run for it")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (checks the harness, not the speed)")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.quick:
        a.sizes, a.dim = "1500", 16
    import tempfile
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_metrics_gpu: no CUDA device visible; run on a GPU machine or pass --device cpu")
    kernel = a.kernel or ("auto" if a.device == "cuda" else "torch-cpu")
    name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    work = a.work or tempfile.mkdtemp(prefix="bench-metrics-gpu-")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    gpu = a.device == "cuda"
    if a.fixed_s is None:
        fixed = run_cli(1000 if a.quick else 2000, a.dim, a.k, kernel, work, 600.0, gpu)
        if "error" in fixed:
            raise SystemExit(f"bench_metrics_gpu: the tiny run failed: {fixed['error']}")
        fixed_s, how = fixed["wall_s"], f"a {fixed['n']}-row run"
    else:
        fixed_s, how = a.fixed_s, "given"
    print(f"# device {name}, torch {torch.__version__}; kernel {kernel}; fixed cost of a run "
          f"({how}) {fixed_s:.1f} s", flush=True)
    rows, prev = [], None
    for n in (int(float(x)) for x in a.sizes.split(",")):
        left = a.budget_s - (time.perf_counter() - t0)
        if prev is not None and "error" not in prev:
            proj = projected_s(prev, fixed_s, n)
            if proj > left:
                rows.append({"n": n, "skipped": f"projected {proj:.0f} s > {left:.0f} s left of --budget-s"})
                print(f"n={n}: skipped, projected {proj:.0f} s > {left:.0f} s left", flush=True)
                continue
        r = run_cli(n, a.dim, a.k, kernel, work, max(1.0, left), gpu)
        if "error" not in r:
            r["gemm_floor"] = gemm_floor(n, a.dim, a.device)
            r["ratio_to_gemm"] = (r["wall_s"] - fixed_s) / r["gemm_floor"]["seconds"]
            r["pairs_per_s"] = 2 * n * n / max(1e-9, r["wall_s"] - fixed_s)
            m = r["metrics"]
            print(f"n={n} d={a.dim} k={a.k}: {r['wall_s']:.1f} s wall ({r['wall_s'] - fixed_s:.1f} s past the fixed "
                  f"cost), GEMM floor {r['gemm_floor']['seconds']:.2f} s (x{r['ratio_to_gemm']:.1f}), "
                  f"device memory {r['gpu_memory_run_mib']} MiB over the {r['gpu_memory_baseline_mib']} MiB in use before, host peak {r['peak_rss_gib']:.2f} GiB; "
                  f"P={m['precision']:.6f} R={m['recall']:.6f} D={m['density']:.6f} C={m['coverage']:.6f} "
                  f"support {m['support_size']}", flush=True)
        else:
            print(f"n={n}: {r['error']}", flush=True)
        rows.append(r)
        prev = r
    res = {"device": name, "torch": torch.__version__, "kernel": kernel, "fixed_s": fixed_s, "sizes": rows,
           "args": vars(a)}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
