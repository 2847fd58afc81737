#!/usr/bin/env python
"""Digits: hybrid ResidualFlowClassifier (accuracy and bits/dim for three
density weights) and ResidualFlowOutlierDetector (novelty-detection AUROC)
against sklearn baselines.

Data
----
``skresflow.datasets.load_digits_images()`` flattened to ``(n, 64)`` integers
in 0..16 (``n_bins=17``). Fixed split ``train_test_split(X, y, test_size=297,
random_state=0)`` (the split of ``bench_digits.py``): 1,500 training / 297
held-out images.

Hybrid table
------------
One tabular MLP residual flow configuration (``FLOW`` below) for every model:
``ResidualFlowDensity`` (the pure density model, the bits/dim reference) and
``ResidualFlowClassifier(head="linear")`` with ``density_weight`` 0, 1/D
("per_dim", D = 64) and 1. Accuracy on the held-out images; bits/dim by the
package's ``bits_per_dim`` (dequantisation bound, one row-hashed noise draw per
image). Baselines for accuracy: ``LogisticRegression`` and ``SVC`` (RBF) on
``X / 16``.

Novelty detection
-----------------
Training images of digits 0-4 only; held-out images of 0-4 are inliers, of 5-9
novelties. AUROC of each detector's score (higher = more normal) for "inlier".
``ResidualFlowOutlierDetector`` (``FLOW``) on the integer images; the sklearn
detectors on one dequantised draw ``(x + u) / 17`` (``default_rng(0)`` for
training, ``default_rng(1)`` for the test images): ``GaussianMixture`` and
``KernelDensity`` tuned by held-out log-likelihood on an 80/20 split of the
inlier training images (never on novelties), ``IsolationForest`` and
``LocalOutlierFactor(novelty=True)`` at their defaults.

Usage::

    python benchmarks/bench_hybrid.py                 # writes docs/benchmarks/
    python benchmarks/bench_hybrid.py --quick --no-write   # smoke test

One torch and BLAS thread (``--threads``): on the shared 2-core machine more
threads are slower.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from skresflow import (
    ResidualFlowClassifier,
    ResidualFlowDensity,
    ResidualFlowOutlierDetector,
)
from skresflow.datasets import load_digits_images

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
FLOW = dict(
    n_bins=17,
    n_blocks=8,
    hidden_dims=(128, 128),
    learning_rate=3e-3,
    batch_size=256,
    max_iter=100,
    validation_fraction=0.0,
    n_iter_no_change=None,
    random_state=0,
)
# The multiscale convolutional flow of bench_digits.py ("resflow-conv-tuned"),
# on (n, 8, 8) images; only for novelty detection (one fit).
CONV = dict(
    n_bins=17,
    learning_rate=3e-3,
    max_iter=100,
    validation_fraction=0.0,
    n_iter_no_change=None,
    random_state=0,
)
INLIERS = (0, 1, 2, 3, 4)
WEIGHTS = (0.0, "per_dim", 1.0)


def load(quick):
    images, y = load_digits_images()
    X = images.reshape(len(images), -1).astype(np.float64)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=297, random_state=0)
    if quick:
        Xtr, ytr = Xtr[:300], ytr[:300]
    return Xtr, Xte, ytr, yte


def dequantise(X, seed):
    return (X + np.random.default_rng(seed).uniform(size=X.shape)) / 17


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def flow_params(quick):
    return {**FLOW, "max_iter": 3} if quick else dict(FLOW)


def run_hybrid(Xtr, Xte, ytr, yte, quick):
    rows = []
    density, seconds = timed(lambda: ResidualFlowDensity(**flow_params(quick)).fit(Xtr))
    rows.append(
        {
            "model": "ResidualFlowDensity (pure density)",
            "density_weight": None,
            "accuracy": None,
            "bits_per_dim": density.bits_per_dim(Xte),
            "fit_s": seconds,
        }
    )
    print(rows[-1], flush=True)
    for weight in WEIGHTS:
        params = {**flow_params(quick), "density_weight": weight, "head": "linear"}
        clf, seconds = timed(lambda p=params: ResidualFlowClassifier(**p).fit(Xtr, ytr))
        rows.append(
            {
                "model": "ResidualFlowClassifier",
                "density_weight": weight,
                "lambda": clf.density_weight_,
                "accuracy": clf.score(Xte, yte),
                "bits_per_dim": clf.bits_per_dim(Xte),
                "fit_s": seconds,
            }
        )
        print(rows[-1], flush=True)
    baselines = {
        "LogisticRegression(max_iter=5000) on X / 16": LogisticRegression(
            max_iter=5000
        ),
        "SVC() (RBF, C=1, gamma='scale') on X / 16": SVC(),
    }
    for name, model in baselines.items():
        _, seconds = timed(lambda m=model: m.fit(Xtr / 16, ytr))
        rows.append(
            {
                "model": name,
                "density_weight": None,
                "accuracy": model.score(Xte / 16, yte),
                "bits_per_dim": None,
                "fit_s": seconds,
            }
        )
        print(rows[-1], flush=True)
    return rows


def tune_by_likelihood(make, grid, Y):
    """Best setting of ``grid`` by held-out log-likelihood (80/20 split of Y)."""
    fit_part, val_part = train_test_split(Y, test_size=0.2, random_state=0)
    scores = {}
    for setting in grid:
        try:
            scores[setting] = make(setting).fit(fit_part).score(val_part)
        except (ValueError, np.linalg.LinAlgError):
            scores[setting] = -np.inf
    best = max(scores, key=scores.get)
    return best, make(best).fit(Y)


def run_novelty(Xtr, Xte, ytr, yte, quick, flows=("mlp",)):
    train = Xtr[np.isin(ytr, INLIERS)]
    is_inlier = np.isin(yte, INLIERS)
    Ytr, Yte = dequantise(train, 0), dequantise(Xte, 1)
    rows = []

    def record(name, settings, scores, seconds):
        rows.append(
            {
                "detector": name,
                "settings": settings,
                "auroc": roc_auc_score(is_inlier, scores),
                "fit_s": seconds,
            }
        )
        print(rows[-1], flush=True)

    if "mlp" in flows:
        det, seconds = timed(
            lambda: ResidualFlowOutlierDetector(**flow_params(quick)).fit(train)
        )
        record(
            "ResidualFlowOutlierDetector",
            "tabular MLP flow, FLOW settings",
            det.score_samples(Xte),
            seconds,
        )
    if "conv" in flows:
        conv = {**CONV, "max_iter": 2} if quick else CONV
        images = train.reshape(-1, 8, 8)
        det, seconds = timed(lambda: ResidualFlowOutlierDetector(**conv).fit(images))
        record(
            "ResidualFlowOutlierDetector",
            "multiscale conv flow on (n, 8, 8), CONV settings",
            det.score_samples(Xte.reshape(-1, 8, 8)),
            seconds,
        )
    gmm_grid = [
        (cov, k)
        for cov in ("full", "diag")
        for k in ((1, 5) if quick else (1, 2, 5, 10, 20, 40))
    ]
    (best, gmm), seconds = timed(
        lambda: tune_by_likelihood(
            lambda s: GaussianMixture(
                n_components=s[1],
                covariance_type=s[0],
                reg_covar=1e-4,
                random_state=0,
            ),
            gmm_grid,
            Ytr,
        )
    )
    record(
        "GaussianMixture",
        f"covariance_type={best[0]}, n_components={best[1]}, reg_covar=1e-4 (tuned)",
        gmm.score_samples(Yte),
        seconds,
    )
    bandwidths = tuple(np.round(np.geomspace(0.02, 0.3, 5 if quick else 12), 4))
    (best, kde), seconds = timed(
        lambda: tune_by_likelihood(
            lambda b: KernelDensity(bandwidth=b), bandwidths, Ytr
        )
    )
    record(
        "KernelDensity",
        f"gaussian, bandwidth={best} (tuned)",
        kde.score_samples(Yte),
        seconds,
    )
    iso, seconds = timed(lambda: IsolationForest(random_state=0).fit(Ytr))
    record(
        "IsolationForest", "defaults, random_state=0", iso.score_samples(Yte), seconds
    )
    lof, seconds = timed(lambda: LocalOutlierFactor(novelty=True).fit(Ytr))
    record(
        "LocalOutlierFactor",
        "novelty=True, n_neighbors=20",
        lof.score_samples(Yte),
        seconds,
    )
    return rows


def kept_rows(part):
    """Rows of the half that ``--part`` does not run, from the last results."""
    path = DOCS / "hybrid_results.json"
    if part == "all" or not path.exists():
        return [], []
    old = json.loads(path.read_text())
    for rows in (old["hybrid"], old["novelty"]):
        for row in rows:
            row["from"] = f"{old['meta']['command']} ({old['meta']['date']})"
    return (
        old["hybrid"] if part == "novelty" else [],
        old["novelty"] if part == "hybrid" else [],
    )


def machine():
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit,
        "load_average": os.getloadavg(),
    }


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def render(meta, hybrid, novelty):
    m = meta["machine"]
    lines = [
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"Machine: {m['nproc']} CPUs (`nproc`; {m['cpu']}), torch {m['torch']}, "
        f"Python {m['python']}, {meta['threads']} torch/BLAS thread(s), code at "
        f"commit {m['commit']} (plus the working tree); load average at start "
        f"{', '.join(f'{v:.1f}' for v in m['load_average'])} (shared machine: "
        f"times are noisy); total {meta['seconds']:.0f} s.",
        "",
    ]
    for name, rows in (("Hybrid", hybrid), ("Novelty", novelty)):
        if rows and "from" in rows[0]:
            lines += [
                f"{name} table kept from the run `{rows[0]['from']}` (same "
                "machine, earlier code state of this page's history).",
                "",
            ]
    lines += [
        "| model | density_weight | lambda | held-out accuracy | bits/dim | fit s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in hybrid:
        weight = r["density_weight"]
        lines.append(
            f"| {r['model']} | {'-' if weight is None else weight}"
            f" | {fmt(r.get('lambda'), 4)} | {fmt(r['accuracy'])} "
            f"| {fmt(r['bits_per_dim'])} | {r['fit_s']:.0f} |"
        )
    lines += [
        "",
        f"Novelty detection (trained on digits {INLIERS}; AUROC of inliers vs "
        "digits 5-9 among the held-out images):",
        "",
        "| detector | settings | AUROC | fit s |",
        "|---|---|---:|---:|",
    ]
    for r in novelty:
        lines.append(
            f"| {r['detector']} | {r['settings']} | {r['auroc']:.4f} "
            f"| {r['fit_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write(meta, hybrid, novelty):
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "hybrid_results.json").write_text(
        json.dumps(
            {"meta": meta, "hybrid": hybrid, "novelty": novelty}, indent=1, default=str
        )
        + "\n"
    )
    page = DOCS / "hybrid.md"
    block = render(meta, hybrid, novelty)
    text = (
        page.read_text()
        if page.exists()
        else (
            "# Hybrid models on digits\n\n"
            "<!-- BEGIN GENERATED -->\n<!-- END GENERATED -->\n"
        )
    )
    head, rest = text.split("<!-- BEGIN GENERATED -->")
    _, tail = rest.split("<!-- END GENERATED -->")
    page.write_text(
        f"{head}<!-- BEGIN GENERATED -->\n\n{block}\n<!-- END GENERATED -->{tail}"
    )
    save_figure(hybrid, novelty, DOCS / "hybrid.png")


def save_figure(hybrid, novelty, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.set_xscale("log")
    left.set_xlim(2.0, 100.0)
    for r in hybrid:
        if r["model"] == "ResidualFlowClassifier":
            left.scatter(r["bits_per_dim"], r["accuracy"], color="C0")
            left.annotate(
                f"lambda={r['lambda']:.3g}",
                (r["bits_per_dim"], r["accuracy"]),
                textcoords="offset points",
                xytext=(4, 4),
            )
        elif r["bits_per_dim"] is not None:
            left.axvline(
                r["bits_per_dim"], color="C1", ls="--", label="pure density model"
            )
        else:
            left.axhline(r["accuracy"], color="grey", ls=":", lw=1)
            left.annotate(
                r["model"].split("(")[0],
                (left.get_xlim()[0], r["accuracy"]),
                fontsize=7,
            )
    left.set(
        xlabel="held-out bits/dim (lower is better; log scale)",
        ylabel="held-out accuracy",
        title="Hybrid trade-off (digits)",
    )
    left.legend(fontsize=7)
    names = [_short_name(r) for r in novelty]
    right.barh(names, [r["auroc"] for r in novelty], color="C2")
    right.set(xlim=(0.5, 1.0), xlabel="AUROC", title="Novelty: digits 5-9")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _short_name(row):
    name = row["detector"].replace("ResidualFlowOutlierDetector", "ResidualFlow")
    if name == "ResidualFlow":
        name += " (conv)" if "conv" in row["settings"] else " (MLP)"
    return name


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--part",
        choices=("all", "hybrid", "novelty"),
        default="all",
        help="run one half; the other half's rows "
        "are kept from docs/benchmarks/hybrid_results.json",
    )
    parser.add_argument(
        "--flows",
        nargs="+",
        choices=("mlp", "conv"),
        default=["mlp", "conv"],
        help="flow detectors to run",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    meta = {
        "command": "python benchmarks/bench_hybrid.py"
        + (" --quick" if args.quick else "")
        + (f" --part {args.part}" if args.part != "all" else "")
        + (f" --flows {' '.join(args.flows)}" if args.flows != ["mlp", "conv"] else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": machine(),
        "threads": args.threads,
        "flow": {k: v for k, v in FLOW.items()},
    }
    data = load(args.quick)
    hybrid, novelty = kept_rows(args.part)
    with threadpool_limits(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        if args.part in ("all", "hybrid"):
            hybrid = run_hybrid(*data, args.quick)
        if args.part in ("all", "novelty"):
            novelty = run_novelty(*data, args.quick, args.flows)
    meta["seconds"] = time.perf_counter() - t0
    print(render(meta, hybrid, novelty))
    if not args.no_write:
        write(meta, hybrid, novelty)


if __name__ == "__main__":
    main()
