#!/usr/bin/env python
"""Held-out log-likelihood of GaussianMixture and KernelDensity tuned on validation.

The baselines of ``bench_tabular.py`` (same data, same tuning grid, same
functions) without the flow: the reference numbers quoted in
``docs/benchmarks/tabular_defaults.md``.

Usage::

    python benchmarks/tabular_baselines.py checkerboard 2spirals rings moons
"""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tabular as bench  # noqa: E402


def main(names):
    warnings.filterwarnings("ignore")
    for name in names:
        Xtr, Xte, _ = bench.load_dataset(name)
        gmm, gmm_params, *_ = bench.tune_gmm(Xtr)
        kde, kde_params, *_ = bench.tune_kde(Xtr)
        print(f"{name} {Xtr.shape} GMM {gmm.score_samples(Xte).mean():.3f} "
              f"{gmm_params} KDE {kde.score_samples(Xte).mean():.3f} {kde_params}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["checkerboard", "2spirals", "rings", "moons"])
