#!/usr/bin/env python
"""Soak test: hundreds of small fit / score / sample cycles, checking memory is flat.

Each cycle fits a fresh tiny ResidualFlowDensity (and refits one long-lived
estimator, and runs one ``partial_fit`` on a third), scores, transforms,
inverts, samples, pickles and saves/loads. The ``partial_fit`` estimator's
``history_`` grows by design (one record, about 0.25 KiB, per call);
``--no-partial-fit`` leaves it out for a run where nothing may grow. A leak (an
autograd graph kept alive by a fitted attribute, a growing cache, a module list
that is never cleared) shows up as growth of one of:

``rss``
    Resident set size from ``/proc/self/statm`` (MiB): everything, including
    torch's C++ tensor buffers.
``traced``
    Bytes currently allocated by Python objects (``tracemalloc``; KiB).
``tensors``
    Live ``torch.Tensor`` objects found by the garbage collector, and how many
    of them carry an autograd graph (``grad_fn``).
``cuda``
    With ``--device cuda``: ``torch.cuda.memory_allocated`` (MiB).

After ``--warmup`` cycles (allocator pools, lazy imports and caches settle)
the figures are sampled every ``--every`` cycles. The run fails (exit status 1)
when, from the first sample after warm-up to the last, RSS grows by more than
``--max-rss-growth`` MiB, traced memory by more than ``--max-traced-growth`` KiB,
or the live-tensor count grows at all, or any tensor with a graph survives a
cycle (or, on a GPU, allocated CUDA memory grows by more than 1 MiB). Results
are printed as a table and optionally written as JSON.

    python benchmarks/bench_soak.py                      # 300 cycles, CPU
    python benchmarks/bench_soak.py --cycles 1000 --json soak.json
"""

import argparse
import gc
import json
import os
import pickle
import platform
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import torch

import skresflow
from skresflow import ResidualFlowDensity

SMALL = dict(
    n_blocks=2,
    hidden_dims=(16,),
    max_iter=2,
    n_iter_no_change=None,
    batch_size=64,
)


def rss_mib():
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors():
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.grad_fn is not None for t in tensors)


def cycle(i, X, refit, online, device, tmp):
    """One round of every public operation; returns nothing that outlives it."""
    est = ResidualFlowDensity(**SMALL, random_state=i, device=device).fit(X)
    scores = est.score_samples(X)
    Z = est.transform(X[:32])
    X_back = est.inverse_transform(Z)
    samples = est.sample(16, random_state=i)
    restored = pickle.loads(pickle.dumps(est))
    est.save(tmp)
    loaded = skresflow.load(tmp)
    checks = [
        scores,
        X_back,
        samples,
        restored.score_samples(X[:8]),
        loaded.score_samples(X[:8]),
    ]
    refit.set_params(random_state=i).fit(X)
    checks.append(refit.score_samples(X[:8]))
    if online is not None:
        online.partial_fit(X)  # (its history_ grows by one small dict per call)
        checks.append(online.score_samples(X[:8]))
    if not all(np.all(np.isfinite(c)) for c in checks):
        raise RuntimeError(f"cycle {i}: a non-finite result")


def sample_point(i, start, device):
    gc.collect()
    n_tensors, with_graph = live_tensors()
    point = {"cycle": i}
    if torch.device(device).type == "cuda":
        point["cuda_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 2)
    return point | {
        "seconds": round(time.perf_counter() - start, 2),
        "rss_mib": round(rss_mib(), 2),
        "traced_kib": round(tracemalloc.get_traced_memory()[0] / 1024, 1),
        "tensors": n_tensors,
        "tensors_with_graph": with_graph,
        "gc_objects": len(gc.get_objects()),
    }


def run(args):
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # ConvergenceWarnings of 2-epoch fits
    rng = np.random.default_rng(0)
    X = rng.normal(size=(args.rows, 2)) * [1.0, 0.3]
    refit = ResidualFlowDensity(**SMALL, device=args.device)
    online = None
    if args.partial_fit:
        online = ResidualFlowDensity(**SMALL, random_state=0, device=args.device)
    tracemalloc.start()
    start, points = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.skrf"
        for i in range(1, args.warmup + args.cycles + 1):
            cycle(i, X, refit, online, args.device, path)
            if i >= args.warmup and (i - args.warmup) % args.every == 0:
                points.append(sample_point(i, start, args.device))
                print(_row(points[-1]), flush=True)
    tracemalloc.stop()
    return points


def _row(p):
    return (
        f"{p['cycle']:6d} {p['seconds']:8.1f} {p['rss_mib']:9.1f} "
        f"{p['traced_kib']:11.1f} {p['tensors']:8d} {p['tensors_with_graph']:6d} "
        f"{p['gc_objects']:9d}"
    )


def verdict(points, args):
    first, last = points[0], points[-1]
    growth = {
        "rss_mib": round(last["rss_mib"] - first["rss_mib"], 2),
        "traced_kib": round(last["traced_kib"] - first["traced_kib"], 1),
        "tensors": last["tensors"] - first["tensors"],
        "max_tensors_with_graph": max(p["tensors_with_graph"] for p in points),
    }
    cycles = last["cycle"] - first["cycle"]
    growth["rss_kib_per_cycle"] = round(growth["rss_mib"] * 1024 / max(cycles, 1), 2)
    failures = []
    if growth["rss_mib"] > args.max_rss_growth:
        failures.append(f"RSS grew {growth['rss_mib']} MiB")
    if "cuda_mib" in last:
        growth["cuda_mib"] = round(last["cuda_mib"] - first["cuda_mib"], 2)
        if growth["cuda_mib"] > 1.0:
            failures.append(f"CUDA memory grew {growth['cuda_mib']} MiB")
    if growth["traced_kib"] > args.max_traced_growth:
        failures.append(f"Python allocations grew {growth['traced_kib']} KiB")
    if growth["tensors"] > 0:
        failures.append(f"{growth['tensors']} more live tensors")
    if growth["max_tensors_with_graph"]:
        failures.append("tensors holding an autograd graph survived a cycle")
    return growth, failures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rss-growth", type=float, default=16.0)
    parser.add_argument("--max-traced-growth", type=float, default=256.0)
    parser.add_argument(
        "--no-partial-fit",
        dest="partial_fit",
        action="store_false",
        help="leave out the long-lived partial_fit estimator (whose history_ "
        "legitimately grows by one record per cycle)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    print(
        f"{'cycle':>6} {'seconds':>8} {'rss MiB':>9} {'traced KiB':>11} "
        f"{'tensors':>8} {'graph':>6} {'gc objs':>9}"
    )
    points = run(args)
    growth, failures = verdict(points, args)
    print("growth after warm-up:", json.dumps(growth))
    print("FAIL: " + "; ".join(failures) if failures else "PASS: memory is flat")
    if args.json:
        report = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
            "args": vars(args) | {"json": str(args.json)},
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}"
            f", {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, numpy {np.__version__}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "points": points,
            "growth": growth,
            "failures": failures,
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
