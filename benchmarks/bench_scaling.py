#!/usr/bin/env python
"""How ResidualFlowDensity's fit time grows with n_samples, n_features, n_blocks.

A small grid around a base setting (``n_samples=1000, n_features=8, n_blocks=4,
hidden_dims=(128, 128)``), a fixed number of epochs (no early stopping, no
validation split), one torch thread, ``--repeats`` fits per point (median). The
growth exponent is the slope of log(time) against log(parameter).
``logdet_estimator="auto"`` trains with the exact log-det up to 8 features and
the unbiased estimator above, so the n_features sweep is also run with
``"unbiased"`` throughout.

Also timed: exact ``score_samples`` of 10,000 rows x 64 features (the goal:
seconds on a laptop CPU) and the unbiased scorer on the same rows, same hidden
layers. Times are CPU seconds of this process (``time.process_time``).

Usage::

    python benchmarks/bench_scaling.py            # writes docs/benchmarks/
    python benchmarks/bench_scaling.py --quick --no-write
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

from skresflow import ResidualFlowDensity, _density

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "docs", "benchmarks", "performance_scaling.json")
BASE = {"n_samples": 1000, "n_features": 8, "n_blocks": 4}
HIDDEN_DIMS = (128, 128)


def make_data(n_samples, n_features, seed=0):
    """Correlated non-Gaussian rows: a random linear mix of Laplace sources."""
    rng = np.random.default_rng(seed)
    sources = rng.laplace(size=(n_samples, n_features))
    mix = rng.normal(size=(n_features, n_features)) / np.sqrt(n_features)
    return sources @ (mix + np.eye(n_features))


def fit_seconds(n_samples, n_features, n_blocks, epochs, estimator="auto"):
    X = make_data(n_samples, n_features)
    est = ResidualFlowDensity(
        n_blocks=n_blocks,
        hidden_dims=HIDDEN_DIMS,
        max_iter=epochs,
        n_iter_no_change=None,
        validation_fraction=0.0,
        logdet_estimator=estimator,
        random_state=0,
    )
    t = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    return time.process_time() - t, est


def sweep(name, values, cfg, estimator="auto"):
    times = {v: [] for v in values}
    for _ in range(cfg.repeats):
        for v in values:  # interleaved: a load spike hits every point alike
            point = {**BASE, name: v}
            times[v].append(
                fit_seconds(**point, epochs=cfg.epochs, estimator=estimator)[0]
            )
    med = [statistics.median(times[v]) for v in values]
    slope = float(np.polyfit(np.log(values), np.log(med), 1)[0])
    return {
        "parameter": name,
        "estimator": estimator,
        "values": list(values),
        "median_seconds": med,
        "all_seconds": [times[v] for v in values],
        "growth_exponent": slope,
    }


def scoring(cfg):
    X = make_data(max(cfg.score_rows, 1000), 64, seed=1)
    _, est = fit_seconds(1000, 64, cfg.score_blocks, epochs=1)
    rows = X[: cfg.score_rows]
    out = {
        "n_rows": len(rows),
        "n_features": 64,
        "n_blocks": cfg.score_blocks,
        "hidden_dims": HIDDEN_DIMS,
    }
    for estimator in ("exact", "unbiased"):
        # "auto" scores exactly up to 128 features; lower the threshold to time
        # the unbiased scorer (20 exact terms, 4 row-hashed probes) on the same rows.
        _density.EXACT_SCORE_MAX_FEATURES = 128 if estimator == "exact" else 0
        est._configure_for_scoring(est.flow_)
        times = []
        for _ in range(cfg.repeats):
            t = time.process_time()
            scores = est.score_samples(rows)
            times.append(time.process_time() - t)
        assert np.isfinite(scores).all()
        out[f"{estimator}_seconds"] = statistics.median(times)
        out[f"{estimator}_scorer"] = est.scoring_estimator_
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--score-rows", type=int, default=10_000)
    p.add_argument("--score-blocks", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=OUT)
    cfg = p.parse_args(argv)
    torch.set_num_threads(cfg.threads)
    grid = {
        "n_samples": [500, 1000, 2000, 4000, 8000],
        "n_features": [2, 8, 32, 64, 128],
        "n_blocks": [2, 4, 8, 16],
    }
    if cfg.quick:
        grid = {k: v[:2] for k, v in grid.items()}
        cfg.epochs, cfg.repeats, cfg.score_rows, cfg.score_blocks = 1, 1, 500, 2
    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "base": BASE,
        "settings": {k: v for k, v in vars(cfg).items() if k != "out"},
        "sweeps": [],
    }
    fit_seconds(200, 2, 1, epochs=1)  # warm-up: first-call initialisations
    for name, values in grid.items():
        report["sweeps"].append(sweep(name, values, cfg))
        print(json.dumps(report["sweeps"][-1]), flush=True)
    report["sweeps"].append(sweep("n_features", grid["n_features"], cfg, "unbiased"))
    print(json.dumps(report["sweeps"][-1]), flush=True)
    report["scoring_10k_x_64"] = scoring(cfg)
    print(json.dumps(report["scoring_10k_x_64"]), flush=True)
    if not cfg.no_write:
        with open(cfg.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print("wrote", os.path.relpath(cfg.out))


if __name__ == "__main__":
    main()
