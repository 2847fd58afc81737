#!/usr/bin/env python
"""Peak memory and time of one training step for the four log-det gradient modes.

For a tabular and an MNIST-shaped image flow, every combination of
``grad`` in (naive, neumann, backward_in_forward, memory_efficient) and
``n`` series terms in (2, 5, 10, 20) is run in its own fresh Python process.
The residual blocks use ``estimator="truncated", n_exact_terms=n``, so every
block evaluates exactly ``n`` power-series terms (no random series length).

One training step is ``opt.zero_grad(); loss = -flow.log_prob(x).mean();
loss.backward(); opt.step()`` with Adam.

Two memory measures are taken in each worker process (see
``docs/benchmarks/logdet_memory.md`` for the reasoning):

``rss``
    The step's resident-set high-water mark above the resident set at the start
    of the step. The kernel's high-water mark (``VmHWM``) is reset right before
    the step by writing ``5`` to ``/proc/self/clear_refs``, so earlier steps
    cannot hide the step's peak. The worker is started with
    ``MALLOC_MMAP_THRESHOLD_`` fixed (64 KiB), so glibc serves every tensor
    buffer of 64 KiB or more with its own ``mmap`` and returns it to the
    kernel on ``free``: RSS then follows the live tensor bytes instead of
    glibc's heap high-water mark.
``saved``
    Peak bytes of tensors held by autograd for backward, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage,
    parameters/buffers/the batch excluded, freed when autograd drops them). It
    includes graphs built *during* backward (the deferred log-det gradient of
    ``backward_in_forward`` / ``memory_efficient``). It does not count
    transient buffers that are never saved (gradient buffers, temporaries).

Usage::

    python benchmarks/bench_logdet_memory.py                  # full run, writes docs/
    python benchmarks/bench_logdet_memory.py --models tabular --ns 2 10 --no-write
    python benchmarks/bench_logdet_memory.py --worker --model image --mode naive --n 10
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

MODES = ("naive", "neumann", "backward_in_forward", "memory_efficient")
NS = (2, 5, 10, 20)
MODELS = ("tabular", "image")
MMAP_THRESHOLD = 64 * 1024
MIB = 1024 ** 2
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "docs" / "benchmarks" / "logdet_memory.json"
DEFAULT_MD = ROOT / "docs" / "benchmarks" / "logdet_memory.md"

# Reference ratios (original implementation, small MNIST-shaped model, n = 10,
# 2-core machine), as quoted in the issue.
REFERENCE = {
    "memory_efficient_mem_pct": 12.5,
    "neumann_mem_pct": 16.6,
    "backward_in_forward_mem_pct": 44.0,
    "neumann_speedup": 2.5,
    "flat_tolerance_pct": 10.0,
}

# Model sizes. Chosen so that one step takes well under a few seconds on one
# CPU thread while the activations are large enough (tens of MiB) for RSS to
# resolve them.
CONFIG = {
    "tabular": {"batch": 1024, "features": 64, "hidden": (128, 128), "blocks": 4},
    "image": {"batch": 32, "shape": (1, 28, 28), "hidden_channels": 32,
              "blocks_per_scale": 2, "scales": 3},
}


# ============================================================================ worker
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _rss_bytes():
    return _status_kib("VmRSS") * 1024


def _hwm_bytes():
    return _status_kib("VmHWM") * 1024


def _reset_hwm():
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Packed:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorTracker:
    """Live and peak bytes of tensors that autograd saves for backward.

    Storages are counted once however many graph nodes save them; storages in
    ``exclude`` (parameters, buffers, the batch) are not counted at all.
    """

    def __init__(self, exclude=()):
        self.exclude = set(exclude)
        self.live = {}
        self.current = self.peak = 0
        self.phase = "forward"
        self.peak_by_phase = {}

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def pack(self, tensor):
        try:
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return tensor
        if ptr in self.exclude or nbytes == 0:
            return tensor
        if ptr in self.live:
            self.live[ptr][1] += 1
        else:
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.peak_by_phase[self.phase] = max(self.peak_by_phase.get(self.phase, 0),
                                                 self.current)
        packed = _Packed(tensor)
        weakref.finalize(packed, self._release, ptr)
        return packed

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed


def build(model, n, mode, torch):
    """Return ``(flow, x)`` for one configuration (fixed seeds)."""
    from skresflow.core import (ActNorm, Flow, LogitTransform, ResidualBlock, Squeeze,
                                conv_branch, mlp_branch)

    cfg = CONFIG[model]
    torch.manual_seed(0)
    kw = {"estimator": "truncated", "n_exact_terms": n, "grad": mode}
    if model == "tabular":
        d = cfg["features"]
        layers = [ActNorm(d)]
        for _ in range(cfg["blocks"]):
            layers += [ResidualBlock(mlp_branch(d, cfg["hidden"]), **kw), ActNorm(d)]
        flow = Flow(layers, (d,))
        mix = torch.randn(d, d) / d ** 0.5
        z = torch.randn(cfg["batch"], d)
        x = z @ mix + 0.5 * torch.sin(2 * z)
    else:
        c, h, w = cfg["shape"]
        hidden = cfg["hidden_channels"]
        layers = [LogitTransform(1e-6)]
        for scale in range(cfg["scales"]):
            if scale:
                layers.append(Squeeze())
                c, h, w = 4 * c, h // 2, w // 2
            for _ in range(cfg["blocks_per_scale"]):
                layers += [ActNorm(c), ResidualBlock(conv_branch(c, hidden), **kw)]
        layers.append(ActNorm(c))
        flow = Flow(layers, cfg["shape"])
        # MNIST-shaped, uniformly dequantised 8-bit values in [0, 1].
        x = (torch.randint(0, 256, (cfg["batch"], *cfg["shape"])).float()
             + torch.rand(cfg["batch"], *cfg["shape"])) / 256
    return flow, x


def worker(args):
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        print("warning: MALLOC_MMAP_THRESHOLD_ not set; RSS follows glibc's heap, "
              "not live tensors", file=sys.stderr)
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    flow, x = build(args.model, args.n, args.mode, torch)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1234)
    n_params = sum(p.numel() for p in flow.parameters())
    n_blocks = len(flow.blocks)

    def forward():
        return -flow.log_prob(x, gen).mean()

    def backward_and_update(loss):
        loss.backward()
        opt.step()

    # Warm-up step: ActNorm data-dependent init, first power iterations, Adam
    # state, autograd/allocator lazy init. Its loss and gradient norm are a
    # cross-mode sanity check (same parameters, same draws in every mode).
    opt.zero_grad(set_to_none=True)
    loss = forward()
    loss.backward()
    warm_loss = loss.item()
    warm_grad_norm = torch.cat([p.grad.flatten() for p in flow.parameters()
                                if p.grad is not None]).norm().item()
    opt.step()
    del loss
    gc.collect()

    # --- measured step: RSS high-water above the step's start, and time.
    opt.zero_grad(set_to_none=True)
    gc.collect()
    _reset_hwm()
    base = _rss_bytes()
    t0 = time.perf_counter()
    loss = forward()
    t_fwd = time.perf_counter() - t0
    held_after_forward = _rss_bytes() - base
    peak_forward = _hwm_bytes() - base
    _reset_hwm()
    t1 = time.perf_counter()
    backward_and_update(loss)
    t_step = time.perf_counter() - t0
    t_bwd = time.perf_counter() - t1
    peak_backward = _hwm_bytes() - base
    del loss
    gc.collect()
    after = _rss_bytes() - base
    times, fwd_times = [t_step], [t_fwd]

    # --- saved-for-backward bytes (hooks slow the step down: not timed).
    exclude = {t.untyped_storage().data_ptr()
               for t in [*flow.parameters(), *flow.buffers(), x]}
    tracker = SavedTensorTracker(exclude)
    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss = forward()
        saved_after_forward = tracker.current
        tracker.phase = "backward"
        backward_and_update(loss)
    del loss
    gc.collect()
    saved_leak = tracker.current

    # --- more timed steps.
    for _ in range(args.repeats - 1):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = forward()
        fwd_times.append(time.perf_counter() - t0)
        backward_and_update(loss)
        times.append(time.perf_counter() - t0)
        del loss

    result = {
        "model": args.model, "mode": args.mode, "n": args.n, "threads": args.threads,
        "batch": CONFIG[args.model]["batch"], "n_blocks": n_blocks, "n_params": n_params,
        "baseline_rss_mib": base / MIB,
        "peak_mib": max(peak_forward, peak_backward) / MIB,
        "peak_forward_mib": peak_forward / MIB,
        "peak_backward_mib": peak_backward / MIB,
        "held_after_forward_mib": held_after_forward / MIB,
        "rss_after_step_mib": after / MIB,
        "saved_peak_mib": tracker.peak / MIB,
        "saved_after_forward_mib": saved_after_forward / MIB,
        "saved_peak_backward_mib": tracker.peak_by_phase.get("backward", 0) / MIB,
        "saved_leak_mib": saved_leak / MIB,
        "step_s": statistics.median(times), "step_s_all": times,
        "forward_s": statistics.median(fwd_times),
        "first_backward_s": t_bwd,
        "warmup_loss": warm_loss, "warmup_grad_norm": warm_grad_norm,
    }
    print("RESULT " + json.dumps(result))


# ============================================================================ driver
def run_config(model, mode, n, threads, repeats):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model,
           "--mode", mode, "--n", str(n), "--threads", str(threads),
           "--repeats", str(repeats)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {model}/{mode}/n={n} failed (rc {proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["process_wall_s"] = wall
    return result


def machine_info():
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": load,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _by(results):
    return {(r["model"], r["mode"], r["n"]): r for r in results}


def evaluate_goals(results, model):
    """The issue's goals, checked at n = 10 (and flatness n = 2 vs 20)."""
    r = _by(results)
    goals = []

    def pct(mode, n, key="peak_mib"):
        return 100 * r[(model, mode, n)][key] / r[(model, "naive", n)][key]

    def have(*keys):
        return all((model, m, n) in r for m, n in keys)

    if have(("naive", 10), ("memory_efficient", 10)):
        v = pct("memory_efficient", 10)
        goals.append(("memory_efficient peak <= 12.5 % of naive (n = 10)",
                      f"{v:.1f} %", v <= REFERENCE["memory_efficient_mem_pct"]))
    if have(("naive", 10), ("neumann", 10)):
        v = pct("neumann", 10)
        goals.append(("neumann peak <= 16.6 % of naive (n = 10)", f"{v:.1f} %",
                      v <= REFERENCE["neumann_mem_pct"]))
    if have(("naive", 10), ("backward_in_forward", 10)):
        v = pct("backward_in_forward", 10)
        goals.append(("backward_in_forward peak <= 44 % of naive (n = 10)", f"{v:.1f} %",
                      v <= REFERENCE["backward_in_forward_mem_pct"]))
    if have(("naive", 10), ("neumann", 10)):
        v = r[(model, "naive", 10)]["step_s"] / r[(model, "neumann", 10)]["step_s"]
        goals.append(("neumann step >= 2.5x faster than naive (n = 10)", f"{v:.2f}x",
                      v >= REFERENCE["neumann_speedup"]))
    if have(("memory_efficient", 2), ("memory_efficient", 20)):
        a = r[(model, "memory_efficient", 2)]["peak_mib"]
        b = r[(model, "memory_efficient", 20)]["peak_mib"]
        v = 100 * (b - a) / a
        goals.append(("memory_efficient flat in n: peak(n = 20) within 10 % of peak(n = 2)",
                      f"{v:+.1f} %", abs(v) <= REFERENCE["flat_tolerance_pct"]))
    return goals


def model_description(model):
    cfg = CONFIG[model]
    if model == "tabular":
        return (f"x: ({cfg['batch']}, {cfg['features']}); ActNorm, then "
                f"{cfg['blocks']} x [ResidualBlock(mlp_branch({cfg['features']}, "
                f"{cfg['hidden']})), ActNorm]")
    c, h, w = cfg["shape"]
    return (f"x: ({cfg['batch']}, {c}, {h}, {w}) dequantised uniform 8-bit; "
            f"LogitTransform(1e-6), {cfg['scales']} scales of {cfg['blocks_per_scale']} x "
            f"[ActNorm, ResidualBlock(conv_branch(C, {cfg['hidden_channels']}))] with a "
            "Squeeze between scales (C = 1, 4, 16), final ActNorm")


def markdown_tables(results, models):
    r = _by(results)
    out = []
    for model in models:
        rows = [x for x in results if x["model"] == model]
        if not rows:
            continue
        any_row = rows[0]
        out.append(f"### {model}\n")
        out.append(f"{model_description(model)}; {any_row['n_blocks']} residual blocks, "
                   f"{any_row['n_params']:,} parameters, {any_row['threads']} torch "
                   "thread(s).\n")
        out.append("| mode | n | peak MiB (RSS) | % of naive | saved-for-backward "
                   "peak MiB | % of naive | held after forward MiB | step s (median) "
                   "| speed vs naive |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        ns = sorted({x["n"] for x in rows})
        for n in ns:
            naive = r.get((model, "naive", n))
            for mode in MODES:
                x = r.get((model, mode, n))
                if x is None:
                    continue
                pct = f"{100 * x['peak_mib'] / naive['peak_mib']:.1f} %" if naive else "-"
                spct = (f"{100 * x['saved_peak_mib'] / naive['saved_peak_mib']:.1f} %"
                        if naive else "-")
                speed = f"{naive['step_s'] / x['step_s']:.2f}x" if naive else "-"
                out.append(f"| {mode} | {n} | {x['peak_mib']:.1f} | {pct} | "
                           f"{x['saved_peak_mib']:.1f} | {spct} | "
                           f"{x['held_after_forward_mib']:.1f} | {x['step_s']:.3f} | "
                           f"{speed} |")
        out.append("")
        goals = evaluate_goals(results, model)
        if goals:
            out.append(f"Goals ({model}):\n")
            out.append("| goal | measured | met |")
            out.append("|---|---:|---|")
            for name, value, ok in goals:
                out.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
            out.append("")
    return "\n".join(out)


def write_markdown(path, payload):
    """Replace the generated block between the markers, keeping hand-written text."""
    begin, end = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
    m = payload["machine"]
    block = "\n".join([
        begin,
        "",
        f"Generated by `{payload['command']}` on {m['date']}.",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, Python "
        f"{m['python']}, {m['platform']}; load average at start "
        f"{', '.join(f'{v:.2f}' for v in m['loadavg_at_start'] or [])}; "
        f"total wall time {payload['total_wall_s']:.0f} s.",
        "",
        markdown_tables(payload["results"], payload["models"]),
        end,
    ])
    path = Path(path)
    text = path.read_text() if path.exists() else f"# Log-det gradient modes: memory\n\n{begin}\n{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--ns", nargs="+", type=int, default=list(NS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads per worker (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed training steps per configuration (median reported)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--markdown", default=str(DEFAULT_MD))
    parser.add_argument("--no-write", action="store_true",
                        help="print the tables only; write nothing")
    # worker mode (one configuration, in this fresh process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args)
        return

    command = "python benchmarks/bench_logdet_memory.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    results, t0 = [], time.perf_counter()
    for model in args.models:
        for n in args.ns:
            for mode in args.modes:
                res = run_config(model, mode, n, args.threads, args.repeats)
                results.append(res)
                print(f"{model:8s} {mode:20s} n={n:2d}  peak {res['peak_mib']:8.1f} MiB  "
                      f"saved {res['saved_peak_mib']:8.1f} MiB  step {res['step_s']:.3f} s"
                      f"  (process {res['process_wall_s']:.0f} s)", flush=True)
    payload = {"command": command.strip(), "machine": machine, "models": args.models,
               "config": CONFIG, "mmap_threshold": MMAP_THRESHOLD, "reference": REFERENCE,
               "total_wall_s": time.perf_counter() - t0, "results": results}
    print()
    print(markdown_tables(results, args.models))
    if not args.no_write:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        write_markdown(args.markdown, payload)
        print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
