#!/usr/bin/env python
"""Confirm the package defaults against one-knob variants at the default step budget.

Each run fits ``ResidualFlowDensity(random_state=seed, **variant)`` (nothing else
passed, so ``max_iter``, ``n_iter_no_change`` and ``learning_rate`` are the "auto"
defaults) on the data of ``bench_tabular.py`` and records the held-out mean
log-likelihood, wall and CPU seconds and epochs. One thread per run.

Usage::

    python benchmarks/confirm_defaults.py --datasets checkerboard digits \\
        --variants default h64 --out docs/benchmarks/confirm_defaults.json
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

from skresflow import ResidualFlowDensity  # noqa: E402

VARIANTS = {
    "default": {},
    "h64": {"hidden_dims": (64, 64)},
    "h128": {"hidden_dims": (128, 128)},
    "lr5e-3": {"learning_rate": 5e-3},
    "nb16": {"n_blocks": 16},
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["checkerboard", "digits"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default="docs/benchmarks/confirm_defaults.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    for name in args.datasets:
        Xtr, Xte, note = bench.load_dataset(name)
        for seed in args.seeds:
            for variant in args.variants:
                load = os.getloadavg()[0]
                t, c = time.perf_counter(), time.process_time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    est = ResidualFlowDensity(random_state=seed, **VARIANTS[variant])
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
