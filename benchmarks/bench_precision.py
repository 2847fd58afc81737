#!/usr/bin/env python
"""Error of log p(x) under mixed precision (torch.autocast), against float64.

A 2-D (moons, 2,000 rows) and a 64-d (dequantised digits) model are fitted at the
estimator's defaults for 20 epochs; the exact log-density of 512 training rows is
then computed in float64, float32, and float32 under ``torch.autocast`` with
bfloat16 and float16 (matrix products in half precision). ``slogdet`` refuses
half-precision input, so the determinant of the narrowest layer is taken in
float32 here (as a mixed-precision option would have to). Prints the mean
absolute error per row in nats, and the spread of log p across rows for scale.

Usage::

    python benchmarks/bench_precision.py
"""

import json
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits

import skresflow.core.jacobian as jacobian
from skresflow import ResidualFlowDensity
from skresflow.datasets import make_toy


def _upcast_determinant():
    original = jacobian.logabsdet_identity_plus

    def logabsdet(m):
        low = m.dtype in (torch.bfloat16, torch.float16)
        return original(m.float() if low else m)

    jacobian.logabsdet_identity_plus = logabsdet


def main():
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    _upcast_determinant()
    data = {
        "moons (2-d)": make_toy("moons", 2000, random_state=0),
        "digits (64-d)": load_digits().data
        + np.random.default_rng(0).uniform(size=(1797, 64)),
    }
    results = {}
    for name, X in data.items():
        model = ResidualFlowDensity(max_iter=20, random_state=0).fit(X)
        flow = model.flow_.eval()
        model._configure_for_scoring(flow)
        x = torch.as_tensor(X[:512])
        with torch.no_grad():
            reference = flow.double().log_prob(x.double(), torch.Generator())
            flow.float()
            row = {"float32": flow.log_prob(x.float(), torch.Generator())}
            for dtype in (torch.bfloat16, torch.float16):
                with torch.autocast("cpu", dtype=dtype):
                    row[str(dtype)] = flow.log_prob(x.float(), torch.Generator())
        results[name] = {
            k: float((v.double() - reference).abs().mean()) for k, v in row.items()
        }
        results[name]["std of log p across rows"] = float(reference.std())
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
