#!/usr/bin/env python
"""Held-out log-likelihood of ResidualFlowDensity vs tuned GaussianMixture and KDE.

Data
----
* The six 2-D toys of :func:`skresflow.datasets.make_toy`: 4,000 training rows
  (``random_state=0``) and a separate held-out sample of 4,000 rows
  (``random_state=1``).
* Tabular sets shipped with scikit-learn (no download): iris (150 x 4), wine
  (178 x 13), breast_cancer (569 x 30), diabetes (442 x 10) and digits
  (1,797 x 64), split 75 / 25 into train / test (``random_state=0``).
  These are recorded at a finite resolution (iris to 0.1 cm, digits to integer
  intensities 0..16, diabetes has a binary column), and a continuous density
  can score arbitrarily high on repeated or binary values. To keep every model
  honest each column is *dequantised at its own recorded resolution* before the
  split: ``x + u`` with ``u ~ U(-r/2, r/2)`` where ``r`` is the smallest gap
  between two distinct values of that column (``r = 1`` for a constant column).
  For digits this is the usual uniform dequantisation of integer pixels
  (``r = 1``), so the continuous log-likelihood is a lower bound on the log
  probability of the integer image. The jitter is drawn once (seed 0) and all
  models see the same numbers.

Models
------
* ``ResidualFlowDensity`` with the package defaults (nothing passed but
  ``random_state``); ``--flow-params '{"n_blocks": 8}'`` overrides some. See
  ``docs/benchmarks/tabular_defaults.md`` for how the defaults were chosen.
* ``GaussianMixture`` tuned on a validation split (20 % of the training rows):
  every ``covariance_type`` x ``n_components`` in 1..50 x ``reg_covar`` in
  {1e-6, 1e-3, 1e-1}; the best setting is refitted on all training rows.
* ``KernelDensity`` (Gaussian kernel) with the bandwidth tuned on the same split
  over 40 log-spaced values in [10^-2.5, 10^1], refitted on all training rows.
  GMM and KDE run on data standardised with a ``StandardScaler`` fitted on the
  training rows; the log-Jacobian ``-sum(log scale)`` is added, so every
  held-out log-likelihood is in nats in the units of the data.

Reported: held-out mean log-likelihood (nats per row, higher is better), fit
time (for GMM / KDE: refit time, and the tuning time separately), the time to
draw 1,000 samples, a fit of 20,000 x 2 rows (time budget), and a figure of the
2-D densities. Written to ``docs/benchmarks/tabular.md`` (generated block),
``tabular_results.json`` and ``tabular_densities.png``.

Usage::

    python benchmarks/bench_tabular.py                    # everything, writes docs/
    python benchmarks/bench_tabular.py --datasets moons iris --no-write
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets as skdatasets
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KernelDensity
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowDensity
from skresflow._base import validation_rows
from skresflow.datasets import TOY_DATASETS, make_toy

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
REAL_DATASETS = ("iris", "wine", "breast_cancer", "diabetes", "digits")
ALL_DATASETS = TOY_DATASETS + REAL_DATASETS

# Step budget emulated through max_iter by ``step_budget_params`` (used by
# tune_tabular_defaults.py, which compares settings at a fixed number of steps).
STEPS = 3000
PATIENCE_STEPS = 1000

GMM_COMPONENTS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50)
GMM_COVARIANCES = ("full", "diag", "tied", "spherical")
GMM_REG = (1e-6, 1e-3, 1e-1)
KDE_BANDWIDTHS = np.logspace(-2.5, 1, 40)


# --------------------------------------------------------------------------- data
def dequantise(X, seed=0):
    """Add U(-r/2, r/2) to each column, r its smallest gap between distinct values."""
    rng = np.random.default_rng(seed)
    X = np.asarray(X, dtype=np.float64)
    res = np.ones(X.shape[1])
    for j in range(X.shape[1]):
        u = np.unique(np.round(X[:, j], 10))
        if len(u) > 1:
            res[j] = np.min(np.diff(u))
    return X + rng.uniform(-0.5, 0.5, X.shape) * res, res


def load_dataset(name):
    """Return ``(X_train, X_test, note)``."""
    if name in TOY_DATASETS:
        return (
            make_toy(name, 4000, random_state=0),
            make_toy(name, 4000, random_state=1),
            "make_toy, 4000 train (rs 0) / 4000 test (rs 1)",
        )
    X = getattr(skdatasets, f"load_{name}")().data
    Xd, res = dequantise(X)
    Xtr, Xte = train_test_split(Xd, test_size=0.25, random_state=0)
    return (
        Xtr,
        Xte,
        (
            f"sklearn load_{name}, dequantised at resolution "
            f"{np.unique(np.round(res, 8)).tolist()[:4]}..., 75/25 split"
        ),
    )


# ---------------------------------------------------------------------- baselines
class _Standardised:
    """Wrap a density on standardised data; report log-densities in data units."""

    def __init__(self, model, scaler):
        self.model, self.scaler = model, scaler
        self.log_jac = -np.log(scaler.scale_).sum()

    def score_samples(self, X):
        return self.model.score_samples(self.scaler.transform(X)) + self.log_jac

    def sample(self, n, random_state=0):
        if isinstance(self.model, GaussianMixture):
            Z = self.model.sample(n)[0]
        else:
            Z = self.model.sample(n, random_state=random_state)
        return self.scaler.inverse_transform(Z)


def _val_split(X):
    return train_test_split(np.arange(X.shape[0]), test_size=0.2, random_state=0)


def tune_gmm(X):
    """Grid-search a GaussianMixture on a validation split, refit on all rows."""
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    fit_idx, val_idx = _val_split(Z)
    t0 = time.perf_counter()
    best, best_params = -np.inf, None
    for cov in GMM_COVARIANCES:
        for reg in GMM_REG:
            for k in GMM_COMPONENTS:
                if k > len(fit_idx) // 2:
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        gm = GaussianMixture(
                            k, covariance_type=cov, reg_covar=reg, random_state=0
                        ).fit(Z[fit_idx])
                    score = gm.score(Z[val_idx])
                except (ValueError, np.linalg.LinAlgError):
                    continue
                if np.isfinite(score) and score > best:
                    best, best_params = (
                        score,
                        dict(n_components=k, covariance_type=cov, reg_covar=reg),
                    )
    tune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(**best_params, random_state=0).fit(Z)
    fit_s = time.perf_counter() - t0
    return _Standardised(gm, scaler), best_params, fit_s, tune_s


def tune_kde(X):
    """Bandwidth of a Gaussian KernelDensity by validation log-likelihood."""
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    fit_idx, val_idx = _val_split(Z)
    t0 = time.perf_counter()
    scores = [
        KernelDensity(bandwidth=h).fit(Z[fit_idx]).score_samples(Z[val_idx]).mean()
        for h in KDE_BANDWIDTHS
    ]
    h = float(KDE_BANDWIDTHS[int(np.nanargmax(scores))])
    tune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kde = KernelDensity(bandwidth=h).fit(Z)
    fit_s = time.perf_counter() - t0
    return _Standardised(kde, scaler), dict(bandwidth=round(h, 4)), fit_s, tune_s


# --------------------------------------------------------------------------- flow
def step_budget_params(
    n_samples,
    *,
    steps=STEPS,
    patience_steps=PATIENCE_STEPS,
    batch_size=256,
    validation_fraction=0.1,
):
    """``max_iter`` / ``n_iter_no_change`` that give ``steps`` optimiser steps.

    Mirrors ``BaseResidualFlow._run_epochs``: the training part of the rows
    (``validation_rows`` decides the rest) is split into batches of ``batch_size``.
    """
    n_train = n_samples - validation_rows(n_samples, validation_fraction)
    per_epoch = -(-n_train // min(batch_size, n_train))
    out = dict(max_iter=max(1, math.ceil(steps / per_epoch)))
    out["n_iter_no_change"] = (
        None
        if patience_steps is None
        else max(1, math.ceil(patience_steps / per_epoch))
    )
    return out, per_epoch


def fit_flow(X, params, random_state=0):
    est = ResidualFlowDensity(random_state=random_state, device="cpu", **params)
    t0 = time.perf_counter()
    c0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    return est, time.perf_counter() - t0, time.process_time() - c0


def time_sampling(model, n=1000):
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        S = model.sample(n, random_state=0)
    return time.perf_counter() - t0, np.asarray(S)


# ------------------------------------------------------------------------- figure
def density_figure(fitted, path, n_grid=200):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in TOY_DATASETS if n in fitted]
    rows = ("data", "ResidualFlow", "GMM", "KDE")
    fig, axes = plt.subplots(
        len(rows), len(names), figsize=(2.4 * len(names), 9.6), squeeze=False
    )
    for j, name in enumerate(names):
        Xte = fitted[name]["X_test"]
        lo, hi = np.percentile(Xte, 0.5, 0) - 0.5, np.percentile(Xte, 99.5, 0) + 0.5
        g0, g1 = np.linspace(lo[0], hi[0], n_grid), np.linspace(lo[1], hi[1], n_grid)
        G = np.stack(np.meshgrid(g0, g1), -1).reshape(-1, 2)
        for i, row in enumerate(rows):
            ax = axes[i, j]
            if row == "data":
                ax.hist2d(
                    Xte[:, 0],
                    Xte[:, 1],
                    bins=100,
                    range=[[lo[0], hi[0]], [lo[1], hi[1]]],
                    cmap="viridis",
                )
            else:
                dens = np.exp(fitted[name][row].score_samples(G)).reshape(
                    n_grid, n_grid
                )
                ax.imshow(
                    dens,
                    origin="lower",
                    extent=(lo[0], hi[0], lo[1], hi[1]),
                    cmap="viridis",
                    aspect="auto",
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(row)
    fig.suptitle(
        "exp(log-density) on a grid; top row: histogram of the 4,000 test rows"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- reporting
def machine_info():
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return dict(
        nproc=os.cpu_count(),
        cpu=model,
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        date=subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        loadavg=load,
    )


def markdown(info, results, timing):
    """The generated block of docs/benchmarks/tabular.md."""
    lines = [
        f"Generated by `{info['command']}` on {info['date']}.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), torch {info['torch']}, "
        f"Python {info['python']}, {info['threads']} thread(s); load average "
        f"{', '.join(f'{x:.1f}' for x in info['loadavg'])} at the start (shared "
        "machine: times are noisy, CPU "
        f"seconds are the better guide). Commit {info['commit']}.",
        "",
        "Held-out mean log-likelihood (nats per row, higher is better); flow fit "
        "in CPU seconds; time to draw 1,000 samples (wall seconds).",
        "",
        "| data | n x d | ResidualFlow | GMM (tuned) | KDE (tuned) | best | "
        "flow fit CPU s (epochs) | sample 1k: flow / GMM / KDE s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lls = {m: r[m]["test_ll"] for m in ("flow", "gmm", "kde")}
        best = {"flow": "flow", "gmm": "GMM", "kde": "KDE"}[max(lls, key=lls.get)]
        lines.append(
            f"| {r['dataset']} | {r['n_train']} x {r['n_features']} | "
            f"{lls['flow']:.3f} | {lls['gmm']:.3f} | {lls['kde']:.3f} | {best} | "
            f"{r['flow']['fit_cpu_s']:.0f} ({r['flow']['epochs']}) | "
            f"{r['flow']['sample_s']:.2f} / {r['gmm']['sample_s']:.3f} / "
            f"{r['kde']['sample_s']:.3f} |"
        )
    if timing:
        lines += [
            "",
            f"Time budget: {timing['dataset']}: {timing['fit_cpu_s']:.0f} CPU s "
            f"({timing['fit_s']:.0f} s wall, {timing['epochs']} epochs), held-out "
            f"log-likelihood {timing['test_ll']:.3f}.",
        ]
    return "\n".join(lines)


def write_page(block, path=DOCS / "tabular.md"):
    """Replace the generated block of ``path`` (kept between the markers)."""
    begin, end = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
    text = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n\n{block}\n\n{end}{tail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--datasets", nargs="+", default=list(ALL_DATASETS), choices=ALL_DATASETS
    )
    parser.add_argument(
        "--flow-params",
        type=json.loads,
        default={},
        help="JSON dict of ResidualFlowDensity parameters to "
        "override the package defaults",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--no-20k",
        action="store_true",
        help="skip the timing fit of the flow on 20,000 x 2 rows",
    )
    parser.add_argument("--out", default=str(DOCS / "tabular_results.json"))
    parser.add_argument(
        "--figure",
        default=str(DOCS / "tabular_densities.png"),
        help="where the figure of the toys' densities goes ('none': no figure)",
    )
    parser.add_argument(
        "--page",
        default=str(DOCS / "tabular.md"),
        help="markdown page whose generated block is rewritten "
        "('none': only the json; see also --merge)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="rebuild --page from the json files of earlier runs "
        "(e.g. toys and real data run in parallel) and exit",
    )
    args = parser.parse_args(argv)
    if args.merge:
        runs = [json.loads(Path(f).read_text()) for f in args.merge]
        timing = next((r["timing_20k"] for r in runs if r["timing_20k"]), None)
        results = [row for r in runs for row in r["results"]]
        info = dict(runs[0]["machine"])
        info["command"] = " and ".join(r["machine"]["command"] for r in runs)
        info["commit"] = " and ".join(r["machine"].get("commit", "?") for r in runs)
        write_page(markdown(info, results, timing), Path(args.page))
        return results
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # numpy / scipy BLAS of GMM and KDE as well
    info = machine_info()
    info["command"] = "python " + " ".join(
        ["benchmarks/bench_tabular.py", *sys.argv[1:]]
    )
    info["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    print(json.dumps(info), flush=True)
    params = args.flow_params

    results, fitted = [], {}
    for name in args.datasets:
        Xtr, Xte, note = load_dataset(name)
        load0 = os.getloadavg()[0]
        flow, fit_s, cpu_s = fit_flow(Xtr, params, random_state=args.seed)
        flow_ll = float(np.mean(flow.score_samples(Xte)))
        flow_train = float(np.mean(flow.score_samples(Xtr)))
        samp_s, _ = time_sampling(flow)
        row = dict(
            dataset=name,
            n_train=Xtr.shape[0],
            n_test=Xte.shape[0],
            n_features=Xtr.shape[1],
            note=note,
            flow=dict(
                test_ll=flow_ll,
                train_ll=flow_train,
                fit_s=fit_s,
                fit_cpu_s=cpu_s,
                sample_s=samp_s,
                epochs=flow.n_iter_,
                params=params,
                loadavg_at_start=load0,
            ),
        )
        fitted[name] = {"X_test": Xte, "ResidualFlow": flow}
        for label, tuner in (("gmm", tune_gmm), ("kde", tune_kde)):
            model, best, fit_s, tune_s = tuner(Xtr)
            ll = float(np.mean(model.score_samples(Xte)))
            samp_s, _ = time_sampling(model)
            row[label] = dict(
                test_ll=ll, fit_s=fit_s, tune_s=tune_s, sample_s=samp_s, params=best
            )
            fitted[name][label.upper()] = model
        results.append(row)
        print(
            json.dumps(
                {
                    "dataset": name,
                    **{
                        m: {
                            k: (round(v, 4) if isinstance(v, float) else v)
                            for k, v in row[m].items()
                            if k != "params"
                        }
                        for m in ("flow", "gmm", "kde")
                    },
                    "gmm_params": row["gmm"]["params"],
                    "kde_params": row["kde"]["params"],
                }
            ),
            flush=True,
        )

    timing = None
    if not args.no_20k:
        # Time budget check: 20,000 x 2 rows (checkerboard), flow only.
        Xtr = make_toy("checkerboard", 20000, random_state=0)
        Xte = make_toy("checkerboard", 4000, random_state=1)
        load0 = os.getloadavg()[0]
        flow, fit_s, cpu_s = fit_flow(Xtr, params, random_state=args.seed)
        timing = dict(
            dataset="checkerboard, 20000 train rows",
            fit_s=fit_s,
            fit_cpu_s=cpu_s,
            epochs=flow.n_iter_,
            test_ll=float(np.mean(flow.score_samples(Xte))),
            loadavg_at_start=load0,
        )
        print(json.dumps({"timing_20k": timing}), flush=True)

    if not args.no_write:
        DOCS.mkdir(parents=True, exist_ok=True)
        info["finished"] = subprocess.run(
            ["date"], capture_output=True, text=True
        ).stdout.strip()
        Path(args.out).write_text(
            json.dumps(
                {"machine": info, "results": results, "timing_20k": timing}, indent=1
            )
        )
        if args.page != "none":
            write_page(markdown(info, results, timing), Path(args.page))
        if args.figure != "none" and any(n in fitted for n in TOY_DATASETS):
            density_figure(fitted, Path(args.figure))
    return results


if __name__ == "__main__":
    main()
