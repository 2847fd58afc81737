#!/usr/bin/env python
"""Inverse solvers: plain fixed point vs Anderson vs Newton vs "auto".

For each problem and solver: the work (evaluations of ``g`` per row, Newton's
Jacobian rows included), the wall time (median of ``--repeats`` interleaved
runs, one torch thread) and the largest error against the plain solution.

Problems:

* stress blocks with Lip(g) = 0.99 (``c Q2 tanh(Q1 x)``, all singular values of
  the Jacobian at 0 equal to c; and ``c W^T tanh(W x)``, symmetric Jacobian),
  d = 2, 8, 32, 1,000 rows, float64, tolerance 1e-10;
* trained flows: ``ResidualFlowDensity`` (8 blocks, hidden 128 x 128) fitted for
  ``--epochs`` epochs on the 2-D moons and on dequantised digits (64-d);
  sampling 2,000 rows in float64 (tolerance 1e-10, the estimator's) and float32
  (1e-5).

Usage::

    python benchmarks/bench_inverse.py               # writes docs/benchmarks/
    python benchmarks/bench_inverse.py --quick --no-write
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from skresflow import ResidualFlowDensity
from skresflow.core import fixed_point_inverse
from skresflow.datasets import make_toy

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "docs", "benchmarks", "performance_inverse.json")
METHODS = ("fixed_point", "anderson", "newton", "auto")


class Counted(torch.nn.Module):
    def __init__(self, g):
        super().__init__()
        self.g, self.rows = g, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.g(x)


class RotatedTanh(torch.nn.Module):
    def __init__(self, d, c, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        qs = [
            torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
            for _ in range(2)
        ]
        self.q1, self.q2, self.c = qs[0], qs[1], c

    def forward(self, x):
        return self.c * torch.tanh(x @ self.q1.t()) @ self.q2.t()


class SymmetricTanh(torch.nn.Module):
    def __init__(self, d, c, seed=0):
        super().__init__()
        w = torch.randn(
            d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        self.w, self.c = w / torch.linalg.matrix_norm(w, ord=2), c

    def forward(self, x):
        return self.c * torch.tanh(x @ self.w.t()) @ self.w


def run_blocks(blocks, z, methods, repeats, **options):
    """Invert ``z`` through ``blocks`` (list of g, applied in reverse)."""
    counted = [Counted(g) for g in blocks]
    times, work, out = {m: [] for m in methods}, {}, {}
    for _ in range(repeats):
        for m in methods:
            for c in counted:
                c.rows = 0
            t = time.perf_counter()
            with torch.no_grad():
                x = z
                for c in reversed(counted):
                    x = fixed_point_inverse(c, x, method=m, **options)
            times[m].append(time.perf_counter() - t)
            work[m] = sum(c.rows for c in counted) / (len(counted) * z.shape[0])
            out[m] = x
    ref = out[methods[0]]
    return {
        m: {
            "seconds": statistics.median(times[m]),
            "g_rows_per_row_per_block": work[m],
            "max_abs_diff_vs_plain": float((out[m] - ref).abs().max()),
        }
        for m in methods
    }


def stress(cfg):
    results = []
    for name, cls in (("rotated_tanh", RotatedTanh), ("symmetric_tanh", SymmetricTanh)):
        for d in cfg.stress_dims:
            g = cls(d, 0.99)
            z = 0.3 * torch.randn(
                cfg.stress_rows,
                d,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(1),
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = run_blocks([g], z, METHODS, cfg.repeats, max_iter=5000)
            results.append({"problem": name, "lip": 0.99, "n_features": d, **r})
            print(json.dumps(results[-1]), flush=True)
    return results


def trained(cfg):
    rng = np.random.default_rng(0)
    from sklearn.datasets import load_digits

    data = {
        "moons": make_toy("moons", n_samples=2000, random_state=0),
        "digits": load_digits().data + rng.uniform(-0.5, 0.5, (1797, 64)),
    }
    results = []
    for name, X in data.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            est = ResidualFlowDensity(
                n_blocks=8, max_iter=cfg.epochs, n_iter_no_change=None, random_state=0
            ).fit(X)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
            flow = est.flow_.to(dtype)
            flow.refresh_lipschitz()
            blocks = [b.g for b in flow.blocks]
            z = torch.randn(
                cfg.flow_rows,
                X.shape[1],
                dtype=dtype,
                generator=torch.Generator().manual_seed(2),
            )
            methods = (
                METHODS if X.shape[1] <= 8 else ("fixed_point", "anderson", "auto")
            )
            r = run_blocks(blocks, z, methods, cfg.repeats)
            results.append(
                {
                    "problem": f"trained {name} ({cfg.epochs} epochs), blocks only",
                    "n_features": X.shape[1],
                    "dtype": str(dtype),
                    "tol": tol,
                    "lipschitz_bounds": [round(b, 3) for b in flow.lipschitz_bounds()],
                    **r,
                }
            )
            print(json.dumps(results[-1]), flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--stress-dims", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--stress-rows", type=int, default=1000)
    p.add_argument("--flow-rows", type=int, default=2000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=OUT)
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.repeats, cfg.epochs, cfg.stress_dims = 1, 1, [2]
        cfg.stress_rows, cfg.flow_rows = 50, 50
    torch.set_num_threads(1)
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1",
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(cfg).items() if k != "out"},
        "stress": stress(cfg),
        "trained": trained(cfg),
    }
    if not cfg.no_write:
        with open(cfg.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print("wrote", os.path.relpath(cfg.out))


if __name__ == "__main__":
    main()
