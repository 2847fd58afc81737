#!/usr/bin/env python
"""Digits novelty detection: ResidualFlowOutlierDetector against sklearn's
detectors on several inlier/novelty class splits.

Data
----
``skresflow.datasets.load_digits_images()`` flattened to ``(n, 64)`` integers
in 0..16, split as in ``bench_hybrid.py``: ``train_test_split(X, y,
test_size=297, random_state=0)``. For a split with inlier classes ``C``, every
detector is fitted on the training images of ``C`` only; it then scores the
held-out images of ``C`` (inliers) and every image of the other classes
(novelties: held-out and training part, none of which any detector has seen).
AUROC of the score (higher = more normal) for "inlier".

Splits
------
``0-4`` (inliers 0-4) is the *selection* split: every choice of the flow
detector (defaults, pixel treatment, training length, score) was made on it.
``5-9`` and three random 5-vs-5 splits (``default_rng(seed).choice(10, 5,
replace=False)``, seeds 1, 2, 3) were not looked at while choosing; they confirm.
Seeds 4, 5, 6 are a second confirmation round, run after the first had been
seen (``SECOND_ROUND_SEEDS``).

Detectors
---------
Flow detectors: ``FLOWS`` below, on the integer images (``n_bins=17``) unless
the variant says "continuous" (then on the dequantised draw the sklearn
detectors see). The integer variants are fitted with
``outlier_score="likelihood_ratio"`` and give two rows from the same fit: the
log-density and the estimator's likelihood ratio ``log p(x) - log q(x)``, ``q``
independent per-pixel categoricals fitted on the training images
(``background_``). Results files from before the option (rows labelled
``log p(x) - log p_pixels(x)``) computed that ratio here, with the recipe of the
user guide; every run now recomputes the recipe (``pixel_background``) and
records its largest difference from the estimator's ratio
(``recipe_max_abs_diff``). sklearn detectors on one dequantised draw ``(x + u) / 17``
(``default_rng(0)`` for training, ``default_rng(1)`` for scoring):
``GaussianMixture`` and ``KernelDensity`` tuned by held-out log-likelihood on an
80/20 split of the inlier training images (never on novelties),
``IsolationForest`` and ``LocalOutlierFactor(novelty=True)`` at their defaults.

Usage::

    python benchmarks/bench_novelty.py                 # writes docs/benchmarks/
    python benchmarks/bench_novelty.py --quick --no-write   # smoke test
    python benchmarks/bench_novelty.py --splits 0-4 --flows auto fixed-128
    python benchmarks/bench_novelty.py --render         # page from the results
    # a rerun of a variant, kept apart from earlier rows in one results file:
    python benchmarks/bench_novelty.py --flows auto --no-baselines --tag abc1234 \
        --out /tmp/rerun.json    # then merge its runs and rows, and --render

``--jobs 2`` runs two fits at once (one thread each).
"""

import argparse
import datetime
import json
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KernelDensity, LocalOutlierFactor
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowOutlierDetector
from skresflow.datasets import load_digits_images

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hybrid import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
SELECTION_SPLIT = "0-4"
RANDOM_SEEDS = (1, 2, 3)
# A second confirmation round, run after the first had been seen, for the
# questions it raised (the wider fixed-128 flow against "auto"; the ratio).
SECOND_ROUND_SEEDS = (4, 5, 6)
# Flow detector variants; every one with random_state=0.
FLOWS = {
    # bench_hybrid.py's FLOW: 8 blocks of (128, 128), 100 epochs, no validation.
    "fixed-128": dict(
        n_bins=17,
        n_blocks=8,
        hidden_dims=(128, 128),
        learning_rate=3e-3,
        max_iter=100,
        validation_fraction=0.0,
        n_iter_no_change=None,
    ),
    # ResidualFlowDensity's "auto" defaults (8 blocks of (32, 32), lr 1e-2,
    # about 2,000 steps, early stopping on a 10% validation split).
    "auto": dict(
        n_bins=17,
        n_blocks="auto",
        hidden_dims="auto",
        learning_rate="auto",
        max_iter="auto",
        n_iter_no_change="auto",
    ),
    # The detector's defaults before it took ResidualFlowDensity's: 4 blocks of
    # (64, 64), lr 3e-3, at most 100 epochs, patience 10 epochs.
    "previous-defaults": dict(
        n_bins=17,
        n_blocks=4,
        hidden_dims=(64, 64),
        learning_rate=3e-3,
        max_iter=100,
        n_iter_no_change=10,
    ),
    # "auto" on the dequantised draw the sklearn detectors see (no n_bins).
    "auto-continuous": dict(
        n_blocks="auto",
        hidden_dims="auto",
        learning_rate="auto",
        max_iter="auto",
        n_iter_no_change="auto",
    ),
}


def splits():
    out = {"0-4": (0, 1, 2, 3, 4), "5-9": (5, 6, 7, 8, 9)}
    for seed in RANDOM_SEEDS + SECOND_ROUND_SEEDS:
        chosen = np.random.default_rng(seed).choice(10, 5, replace=False)
        out[f"random-{seed}"] = tuple(sorted(int(c) for c in chosen))
    return out


def load():
    images, y = load_digits_images()
    X = images.reshape(len(images), -1).astype(np.float64)
    return train_test_split(X, y, test_size=297, random_state=0)


def dequantise(X, seed):
    return (X + np.random.default_rng(seed).uniform(size=X.shape)) / 17


def split_data(inliers, quick):
    Xtr, Xte, ytr, yte = load()
    train = Xtr[np.isin(ytr, inliers)]
    novel = np.r_[Xtr[~np.isin(ytr, inliers)], Xte[~np.isin(yte, inliers)]]
    held = Xte[np.isin(yte, inliers)]
    if quick:
        train, novel = train[:150], novel[:150]
    test = np.r_[held, novel]
    is_inlier = np.r_[np.ones(len(held), bool), np.zeros(len(novel), bool)]
    return train, test, is_inlier


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


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


def sklearn_detectors(Ytr, Yte, quick):
    """``(name, settings, scores, seconds)`` of the four sklearn detectors."""
    grid = [
        (cov, k)
        for cov in ("full", "diag")
        for k in ((1, 5) if quick else (1, 2, 5, 10, 20, 40))
    ]
    make_gmm = lambda s: GaussianMixture(  # noqa: E731
        n_components=s[1], covariance_type=s[0], reg_covar=1e-4, random_state=0
    )
    (best, gmm), seconds = timed(lambda: tune_by_likelihood(make_gmm, grid, Ytr))
    yield (
        "GaussianMixture",
        f"{best[0]}, {best[1]} components (tuned)",
        gmm.score_samples(Yte),
        seconds,
    )
    bandwidths = tuple(np.round(np.geomspace(0.02, 0.3, 5 if quick else 12), 4))
    (best, kde), seconds = timed(
        lambda: tune_by_likelihood(
            lambda b: KernelDensity(bandwidth=b), bandwidths, Ytr
        )
    )
    yield "KernelDensity", f"bandwidth {best} (tuned)", kde.score_samples(Yte), seconds
    iso, seconds = timed(lambda: IsolationForest(random_state=0).fit(Ytr))
    yield "IsolationForest", "defaults", iso.score_samples(Yte), seconds
    lof, seconds = timed(lambda: LocalOutlierFactor(novelty=True).fit(Ytr))
    yield "LocalOutlierFactor", "novelty=True", lof.score_samples(Yte), seconds


def pixel_background(train, test):
    """log-probability of ``test`` under independent per-pixel categoricals
    (17 levels, add-one smoothing) fitted on ``train``: the user guide's former
    recipe, kept as a cross-check of ``outlier_score="likelihood_ratio"``."""
    counts = (
        np.stack([np.bincount(col.astype(int), minlength=17) for col in train.T]) + 1.0
    )
    log_p = np.log(counts / counts.sum(axis=1, keepdims=True))
    return log_p[np.arange(train.shape[1]), test.astype(int)].sum(axis=1)


def auroc_se(auroc, n_pos, n_neg):
    """Hanley and McNeil's (1982) standard error of an AUROC."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    var = (
        auroc * (1 - auroc)
        + (n_pos - 1) * (q1 - auroc**2)
        + (n_neg - 1) * (q2 - auroc**2)
    ) / (n_pos * n_neg)
    return float(np.sqrt(var))


def flow_detector(name, train, test, Ytr, Yte, quick, seed=0):
    """``(log-density, likelihood ratio or None, seconds, info)`` of one fit."""
    params = {**FLOWS[name], "random_state": seed}
    if quick:
        params.update(max_iter=3)
    continuous = "n_bins" not in params
    if not continuous:  # the background costs one pass; the flow fit is the same
        params.update(outlier_score="likelihood_ratio")
    fit_X, score_X = (Ytr, Yte) if continuous else (train, test)
    det, seconds = timed(lambda: ResidualFlowOutlierDetector(**params).fit(fit_X))
    ratio = None if continuous else det.score_samples(score_X)
    # The log-density of the same fit (background_ and the flow stay as fitted).
    det.set_params(outlier_score="log_density")
    info = {
        "n_iter": det.n_iter_,
        "train_log_density": float(det.score(fit_X)),
        "val_loss": det.history_[-1].get("val_loss"),
    }
    return det.score_samples(score_X), ratio, seconds, info


def run_split(split, inliers, flows, baselines, quick, threads, seed=0, label_tag=None):
    """Rows of the ``flows`` detectors (and of the sklearn ones if ``baselines``)."""
    torch.set_num_threads(threads)
    train, test, is_inlier = split_data(inliers, quick)
    Ytr, Yte = dequantise(train, 0), dequantise(test, 1)
    rows = []

    def record(detector, settings, scores, seconds, **extra):
        auroc = float(roc_auc_score(is_inlier, scores))
        rows.append(
            {
                "split": split,
                "inliers": list(inliers),
                "detector": detector,
                "settings": settings,
                "auroc": auroc,
                "auroc_se": auroc_se(auroc, is_inlier.sum(), (~is_inlier).sum()),
                "fit_s": seconds,
                **extra,
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    with threadpool_limits(threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        for name in flows:
            scores, ratio, seconds, info = flow_detector(
                name, train, test, Ytr, Yte, quick, seed
            )
            info["held_out_inlier_log_density"] = float(scores[is_inlier].mean())
            tag = name if seed == 0 else f"{name} (random_state={seed})"
            tag = tag if label_tag is None else f"{tag} [{label_tag}]"
            record("ResidualFlowOutlierDetector", tag, scores, seconds, **info)
            if ratio is not None:
                recipe = scores - pixel_background(train, test)
                record(
                    "ResidualFlowOutlierDetector",
                    f"{tag}, likelihood_ratio",
                    ratio,
                    seconds,
                    recipe_max_abs_diff=float(np.max(np.abs(ratio - recipe))),
                    recipe_auroc=float(roc_auc_score(is_inlier, recipe)),
                )
        for row in sklearn_detectors(Ytr, Yte, quick) if baselines else ():
            record(*row)
    return rows


def load_results(path):
    """``(runs, rows)`` of a results file; every row names its run (index)."""
    if not Path(path).exists():
        return [], []
    data = json.loads(Path(path).read_text())
    return data["runs"], data["rows"]


def label(row):
    if row["detector"] == "ResidualFlowOutlierDetector":
        return f"ResidualFlow: {row['settings']}"
    return row["detector"]


def split_header(split):
    inliers = "".join(str(c) for c in splits()[split])
    name = split if split in ("0-4", "5-9") else f"{split} ({inliers})"
    return name + (" (selection)" if split == SELECTION_SPLIT else "")


def render(runs, rows):
    names = [s for s in splits() if any(r["split"] == s for r in rows)]
    second = [s for s in names if s in {f"random-{k}" for k in SECOND_ROUND_SEEDS}]
    confirm = [s for s in names if s != SELECTION_SPLIT and s not in second]
    auroc = {(label(r), r["split"]): r["auroc"] for r in rows}
    detectors = list(dict.fromkeys(label(r) for r in rows))
    detectors.sort(key=lambda d: not d.startswith("ResidualFlow"))  # flows first
    best = {s: max(v for (d, t), v in auroc.items() if t == s) for s in names}
    lines = []
    for i, meta in enumerate(runs):
        m = meta["machine"]
        lines += [
            f"Run {i + 1}: `{meta['command']}` on {meta['date']}: {m['nproc']} CPUs "
            f"(`nproc`; {m['cpu']}), torch {m['torch']}, Python {m['python']}, "
            f"{meta['threads']} torch/BLAS thread(s) per process, code at commit "
            f"{m['commit'] or '(not recorded: not a git checkout)'}; load average "
            "at start "
            f"{', '.join(f'{v:.1f}' for v in m['load_average'])} (shared machine); "
            f"{meta['seconds']:.0f} s.",
            "",
        ]
    lines += [
        "AUROC, held-out inliers against unseen classes (bold: best of the "
        f"column). Choices were made on split {SELECTION_SPLIT} only; the means "
        "are over the other (confirmation) splits.",
        "",
        "| detector | "
        + " | ".join(split_header(s) for s in names)
        + (
            " | mean, first confirmation round | mean, second round | mean, both |"
            if second
            else " | mean of confirmation splits |"
        ),
        "|---|" + "---:|" * (len(names) + (3 if second else 1)),
    ]
    for d in detectors:
        cells = []
        for s in names:
            v = auroc.get((d, s))
            text = "-" if v is None else f"{v:.4f}"
            cells.append(f"**{text}**" if v is not None and v == best[s] else text)
        means = []
        for group in (confirm, second, confirm + second) if second else (confirm,):
            values = [auroc[(d, s)] for s in group if (d, s) in auroc]
            full = bool(group) and len(values) == len(group)
            means.append(f"{np.mean(values):.4f}" if full else "-")
        lines.append(f"| {d} | " + " | ".join(cells + means) + " |")
    lines += [
        "",
        "Flow fits (epochs run, fit seconds, mean log-density of the training "
        "images and of the held-out inliers), and the settings the sklearn "
        "detectors tuned:",
        "",
        "| split | detector | epochs | fit s | train log p | held-out inlier log p |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "n_iter" in r:
            lines.append(
                f"| {r['split']} | {r['settings']} | {r['n_iter']} "
                f"| {r['fit_s']:.0f} | {r['train_log_density']:.1f} "
                f"| {r['held_out_inlier_log_density']:.1f} |"
            )
        elif "tuned" in r["settings"]:
            lines.append(f"| {r['split']} | {r['detector']}: {r['settings']} | | | | |")
    se = [r["auroc_se"] for r in rows]
    lines += [
        "",
        f"Standard errors of single AUROCs (Hanley and McNeil): {min(se):.4f} to "
        f"{max(se):.4f}.",
    ]
    return "\n".join(lines) + "\n"


def write_page(runs, rows):
    page = DOCS / "novelty.md"
    text = page.read_text()
    head, rest = text.split("<!-- BEGIN GENERATED -->")
    _, tail = rest.split("<!-- END GENERATED -->")
    block = render(runs, rows)
    page.write_text(
        f"{head}<!-- BEGIN GENERATED -->\n\n{block}\n<!-- END GENERATED -->{tail}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--splits", nargs="+", default=list(splits()))
    parser.add_argument("--flows", nargs="*", choices=list(FLOWS), default=list(FLOWS))
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument(
        "--random-state", type=int, default=0, help="seed of the flow fits"
    )
    parser.add_argument(
        "--tag",
        default=None,
        help="appended to the flow rows' labels (keeps a rerun's rows apart from "
        "earlier runs' rows of the same variant in one results file)",
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add this run's rows to the results file instead of replacing it",
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the page from the results"
    )
    parser.add_argument("--out", default=str(DOCS / "novelty_results.json"))
    args = parser.parse_args()
    if args.render:
        return write_page(*load_results(args.out))
    meta = {
        "command": "python benchmarks/bench_novelty.py "
        + " ".join(a for a in os.sys.argv[1:] if a not in ("--no-write",)).strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": machine(),
        "threads": args.threads,
        "selection_split": SELECTION_SPLIT,
        "flows": {k: FLOWS[k] for k in args.flows},
        "random_state": args.random_state,
        "tag": args.tag,
    }
    t0 = time.perf_counter()
    table = splits()
    # One task per flow fit and one for the sklearn detectors of each split.
    tasks = [(s, table[s], [f], False) for s in args.splits for f in args.flows]
    if not args.no_baselines:
        tasks += [(s, table[s], [], True) for s in args.splits]
    tasks = [(*t, args.quick, args.threads, args.random_state, args.tag) for t in tasks]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_split, *zip(*tasks, strict=True)))
    meta["seconds"] = time.perf_counter() - t0
    order = {s: i for i, s in enumerate(args.splits)}
    rows = sorted(
        (r for part in results for r in part), key=lambda r: order[r["split"]]
    )
    runs, old_rows = load_results(args.out) if args.append else ([], [])
    for row in rows:
        row["run"] = len(runs)
    runs, rows = runs + [meta], old_rows + rows
    print(render(runs, rows))
    if not args.no_write:
        Path(args.out).write_text(
            json.dumps({"runs": runs, "rows": rows}, indent=1, default=str) + "\n"
        )
        write_page(runs, rows)


if __name__ == "__main__":
    main()
