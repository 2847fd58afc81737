#!/usr/bin/env python
"""Training, scoring and sampling speed on a CUDA GPU against the CPU.

Every number goes through the public estimator (``fit``, ``score_samples``,
``sample``), so it includes what a user pays: batches moved to the device, the
per-step loss read back to the host, the Lipschitz refresh.

- **Training steps per second** at the estimator's defaults for four models: 2-D
  (checkerboard), 64-d (dequantised digits as a table), the default image model
  (digits as 1x8x8 images) and the paper's MNIST model (``paper_config("mnist")``
  on 28x28 images of random pixels: the speed does not depend on the content).
  Each fit runs ``epochs`` epochs of ``steps`` steps without validation; the
  rate is taken from the median of the epochs after the first (``history_``).
  Tables also run at a larger batch, where a GPU has room to work.
- **TF32**: the same steps with ``torch.backends.cuda.matmul.allow_tf32`` on
  (torch's default leaves it off for matrix products and on for convolutions),
  and the error it brings to a float32 log-density (float64 is the reference);
  skresflow leaves that global switch to the user.
- **Scoring and sampling** rows per second of the 64-d model.

Usage (a machine with CUDA; ``--quick`` for a smoke run, ``--devices cpu`` off a
GPU)::

    python benchmarks/bench_gpu.py --out gpu.json
"""

import argparse
import json
import platform
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits

from skresflow import ResidualFlowDensity
from skresflow.datasets import make_toy
from skresflow.presets import paper_config


def _digits_table():
    return load_digits().data + np.random.default_rng(0).uniform(size=(1797, 64))


def _models(quick):
    """``name -> (X, params, batches, cpu_ok)``."""
    digits = load_digits().data.reshape(-1, 1, 8, 8)
    mnist = np.random.default_rng(0).integers(0, 256, size=(4096, 1, 28, 28))
    paper = paper_config("mnist")
    if quick:
        paper.update(n_blocks=2, hidden_channels=32)
    return {
        "2-d (checkerboard)": (
            make_toy("checkerboard", 20000, random_state=0),
            {},
            (256, 4096),
            True,
        ),
        "64-d (digits table)": (_digits_table(), {}, (256, 1024), True),
        "image 1x8x8 (digits)": (digits, {"n_bins": 17}, (256,), True),
        "image 1x28x28 (paper MNIST model)": (
            mnist,
            paper,
            (paper["batch_size"],),
            quick,
        ),
    }


def steps_per_second(X, params, batch, device, steps, epochs, tf32=False):
    """Training steps/s of a fit of ``epochs`` x ``steps`` steps."""
    n = min(X.shape[0], batch * steps)
    X = X[np.random.default_rng(1).permutation(X.shape[0])[:n]]
    steps = -(-n // batch)
    torch.backends.cuda.matmul.allow_tf32 = tf32  # convolutions: torch's default
    try:
        est = ResidualFlowDensity(
            **{**params, "batch_size": batch},
            max_iter=epochs,
            validation_fraction=0.0,
            n_iter_no_change=None,
            device=device,
            random_state=0,
        ).fit(X)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    seconds = [h["seconds"] for h in est.history_[1:]]
    return steps / float(np.median(seconds)), est


def tf32_error(X, device):
    """Mean |log p| error of float32 scoring with and without TF32 (nats)."""
    est = ResidualFlowDensity(max_iter=2, random_state=0, device=device).fit(X)
    flow = est.flow_.eval()
    est._configure_for_scoring(flow)
    x = torch.as_tensor(X[:2048], device=device)
    out = {}
    with torch.no_grad():
        reference = flow.double().log_prob(x.double(), torch.Generator())
        flow.float()
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            log_p = flow.log_prob(x.float(), torch.Generator()).double()
            out["tf32" if tf32 else "float32"] = float((log_p - reference).abs().mean())
        torch.backends.cuda.matmul.allow_tf32 = False
    return out


def rows_per_second(fn, n_rows, repeats=3):
    fn()  # warm-up (kernels, caches)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_rows / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="cuda,cpu")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    devices = args.devices.split(",")
    cuda = "cuda" in devices and torch.cuda.is_available()
    info = {
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(info), flush=True)
    results = {"machine": info, "training": [], "tf32": [], "inference": []}

    for name, (X, params, batches, cpu_ok) in _models(args.quick).items():
        for batch in batches:
            row = {"model": name, "batch": batch}
            for device in devices:
                if device == "cpu" and not cpu_ok:
                    continue
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                row[device], _ = steps_per_second(
                    X, params, batch, device, args.steps, args.epochs
                )
                if device == "cuda":
                    row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                if device == "cuda" and params.get("n_bins") != 256:
                    row["cuda_tf32"], _ = steps_per_second(
                        X, params, batch, device, args.steps, args.epochs, tf32=True
                    )
            print(json.dumps(row), flush=True)
            results["training"].append(row)

    for name, X in (
        ("2-d", make_toy("checkerboard", 4000, random_state=0)),
        ("64-d", _digits_table()),
    ):
        if cuda:
            row = {"model": name, **tf32_error(X, "cuda")}
            print(json.dumps(row), flush=True)
            results["tf32"].append(row)

    X = _digits_table()
    X10k = np.concatenate([X] * 6)[:10000]
    for device in devices:
        est = ResidualFlowDensity(max_iter=2, random_state=0, device=device).fit(X)
        row = {
            "model": "64-d",
            "device": device,
            "score_samples_exact_rows_per_s": rows_per_second(
                lambda est=est: est.score_samples(X10k), len(X10k)
            ),
            "sample_rows_per_s": rows_per_second(
                lambda est=est: est.sample(10000, random_state=0), 10000
            ),
        }
        print(json.dumps(row), flush=True)
        results["inference"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
