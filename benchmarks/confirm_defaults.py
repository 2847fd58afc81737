#!/usr/bin/env python
"""Confirm the package defaults against one-knob variants at the default step budget.

Each run fits ``ResidualFlowDensity(random_state=seed, **variant)`` (nothing else
passed, so ``max_iter``, ``n_iter_no_change`` and ``learning_rate`` are the "auto"
defaults) on the data of ``bench_tabular.py`` and records the held-out mean
log-likelihood, wall and CPU seconds and epochs. One thread per run.

A variant may give its training length as ``steps`` (optimiser steps), which is
converted into ``max_iter`` for the data set and batch size (the package counts
epochs). ``--validation`` scores the toys on a third sample
(``make_toy(name, 4000, random_state=2)``) instead of the benchmark's test
sample, so that defaults are chosen without looking at the test set.

Usage::

    python benchmarks/confirm_defaults.py --datasets checkerboard digits \\
        --variants default h64 --out docs/benchmarks/confirm_defaults.json
    python benchmarks/confirm_defaults.py --validation --datasets rings \\
        --variants default bs1024 --seeds 0 1 --out /tmp/bs.json
"""

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tabular as bench  # noqa: E402

import skresflow._base as base  # noqa: E402
from skresflow import ResidualFlowDensity  # noqa: E402
from skresflow.datasets import make_toy  # noqa: E402

VARIANTS = {
    "default": {},
    "h64": {"hidden_dims": (64, 64)},
    "h128": {"hidden_dims": (128, 128)},
    "lr5e-3": {"learning_rate": 5e-3},
    "lr2e-2": {"learning_rate": 2e-2},
    "lr4e-2": {"learning_rate": 4e-2},
    "nb16": {"n_blocks": 16},
    # Four times the batch for two thirds of the low-dimensional default's
    # 3,000 steps: 2.7x the rows seen, 1.26x the CPU time (tabular_defaults.md).
    "bs1024": {"batch_size": 1024, "steps": 2000},
    "c0.99": {"lipschitz_coeff": 0.99},
    "bs512": {"batch_size": 512, "steps": 3000},
    # Deeper for fewer steps, at about the low-dimensional default's CPU time.
    "nb24s2000": {"n_blocks": 24, "steps": 2000},
    "nb32s1500": {"n_blocks": 32, "steps": 1500},
    # Training lengths around the low-dimensional default (4,500 steps).
    "s3000": {"steps": 3000},
    "s4500": {"steps": 4500},
    "s6000": {"steps": 6000},
    "s12000": {"steps": 12000},
    # Plain early stopping: no learning-rate decay when the patience runs out.
    "noanneal": {"anneal_on_plateau": False},
}


def params_for(variant, n_rows):
    """The estimator's parameters for ``variant``; ``steps`` becomes ``max_iter``."""
    params = dict(VARIANTS[variant])
    steps = params.pop("steps", None)
    if steps is not None:
        budget, _ = bench.step_budget_params(
            n_rows,
            steps=steps,
            patience_steps=None,
            batch_size=params.get("batch_size", 256),
        )
        params["max_iter"] = budget["max_iter"]
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["checkerboard", "digits"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="docs/benchmarks/confirm_defaults.json")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="score the toys on make_toy(name, 4000, random_state=2)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    for name in args.datasets:
        Xtr, Xte, note = bench.load_dataset(name)
        if args.validation:
            if name not in bench.TOY_DATASETS:
                parser.error("--validation is for the toys (they have a third sample)")
            Xte, note = make_toy(name, 4000, random_state=2), note + ", scored on rs 2"
        for seed in args.seeds:
            for variant in args.variants:
                load = os.getloadavg()[0]
                t, c = time.perf_counter(), time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    params = params_for(variant, Xtr.shape[0])
                    base.ANNEAL_ON_PLATEAU = params.pop("anneal_on_plateau", True)
                    est = ResidualFlowDensity(random_state=seed, **params)
                    est.fit(Xtr)
                row = dict(dataset=name, variant=variant, seed=seed,
                           test_ll=float(np.mean(est.score_samples(Xte))),
                           fit_s=time.perf_counter() - t, cpu_s=time.process_time() - c,
                           epochs=est.n_iter_, loadavg=load, data=note,
                           date=time.strftime("%Y-%m-%d %H:%M"))
                print(json.dumps(row), flush=True)
                runs.append(row)
                out.write_text(json.dumps({"command": " ".join(sys.argv),
                                           "torch": torch.__version__,
                                           "nproc": os.cpu_count(), "runs": runs},
                                          indent=1))


if __name__ == "__main__":
    main()
