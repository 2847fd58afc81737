#!/usr/bin/env python
"""Small data sets: ``max_iter="auto"`` with and without its 500-epoch cap.

``max_iter="auto"`` runs about 2,000 optimiser steps; on tables of a few hundred
rows that is hundreds to thousands of epochs. This compares the capped default
(at most ``AUTO_MAX_EPOCHS`` = 500 epochs) with the uncapped step budget
(``ceil(2000 / steps_per_epoch)`` epochs), everything else at the defaults, on
six small sets, scored on held-out rows never used in fitting:

* iris, wine, breast_cancer, diabetes: the training part of
  ``bench_tabular.load_dataset`` (dequantised, 75 %), split again 75 / 25 into
  fitting and scoring rows (``random_state=1``);
* moons, pinwheel: 150 rows of ``make_toy`` (``random_state=3``), scored on
  3,000 fresh rows (``random_state=4``).

Usage::

    python benchmarks/bench_small_data.py --seeds 0 1 --out /tmp/small.json
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split

from skresflow import ResidualFlowDensity
from skresflow._base import AUTO_STEPS
from skresflow.datasets import make_toy

sys.path.insert(0, str(Path(__file__).parent))
from bench_tabular import load_dataset  # noqa: E402

DATASETS = ("iris", "wine", "breast_cancer", "diabetes", "moons", "pinwheel")


def split(name):
    if name in ("moons", "pinwheel"):
        return make_toy(name, 150, random_state=3), make_toy(name, 3000, random_state=4)
    X, _, _ = load_dataset(name)
    return train_test_split(X, test_size=0.25, random_state=1)


def uncapped_epochs(n_rows, est):
    n_train = n_rows - int(est.validation_fraction * n_rows)
    steps_per_epoch = -(-n_train // min(est.batch_size, n_train))
    return -(-AUTO_STEPS["tabular"] // steps_per_epoch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = []
    for name in args.datasets:
        A, V = split(name)
        for seed in args.seeds:
            for variant in ("capped (default)", "uncapped"):
                est = ResidualFlowDensity(random_state=seed)
                if variant == "uncapped":
                    est.set_params(max_iter=uncapped_epochs(len(A), est))
                t = time.process_time()
                est.fit(A)
                row = {
                    "data": name,
                    "n_fit": len(A),
                    "seed": seed,
                    "variant": variant,
                    "held_out": float(est.score(V)),
                    "train": float(est.score(A)),
                    "epochs": est.n_iter_,
                    "cpu_s": time.process_time() - t,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
