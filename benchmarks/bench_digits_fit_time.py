#!/usr/bin/env python
"""CPU time of one default image fit on digits, for before/after comparisons.

Fits ``ResidualFlowDensity(n_bins=17, random_state=0)`` on 1,500 of the 1,797
8x8 digits (a fixed permutation, ``numpy`` seed 0), on one thread, and prints
the fit's and the scoring's CPU seconds and the test bits/dim of the other 297.
Run it once per version of the package, back to back, e.g. an export of an
older commit first::

    git archive OLD skresflow | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python benchmarks/bench_digits_fit_time.py
    python benchmarks/bench_digits_fit_time.py
"""

import json
import time
import warnings

import numpy as np
import torch

import skresflow
from skresflow import ResidualFlowDensity
from skresflow.datasets import load_digits_images


def main():
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    X = load_digits_images()[0]
    perm = np.random.default_rng(0).permutation(len(X))
    train, test = X[perm[:1500]], X[perm[1500:]]
    t0 = time.process_time()
    est = ResidualFlowDensity(n_bins=17, random_state=0).fit(train)
    fit_s = time.process_time() - t0
    t0 = time.process_time()
    bpd = est.bits_per_dim(test)
    result = {
        "package": skresflow.__file__,
        "fit_cpu_s": round(fit_s, 1),
        "score_cpu_s": round(time.process_time() - t0, 1),
        "test_bits_per_dim": round(bpd, 4),
        "epochs": est.n_iter_,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
