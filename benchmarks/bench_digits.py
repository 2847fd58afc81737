#!/usr/bin/env python
"""Digits (8x8 images, 17 grey levels): test bits/dim of ResidualFlowDensity
against GaussianMixture and KernelDensity in the same dequantised space, fit and
sampling times, a picture of samples, and the spread of the unbiased scoring
estimator.

Data
----
``skresflow.datasets.load_digits_images()``: 1,797 images of 8 x 8 integers in
0..16 (``n_bins = 17``, D = 64). Fixed split ``train_test_split(test_size=297,
random_state=0)``: 1,500 training / 297 test images.

The common space
----------------
Every model is a density on ``y = (x + u) / 17`` in ``[0, 1)^64``, ``u ~ U(0, 1)``
per pixel, the flow's own dequantisation. For a continuous density ``p``

    bits/dim = -(mean_i log p(y_i) - 64 log 17) / (64 ln 2),

an upper bound on the bits/dim of the discrete images (Theis et al. 2016).
The test set is dequantised ``N_TEST_DRAWS`` times (``numpy.random.default_rng(
1000 + j)``) and *every* model is scored on the same draws; the table gives
the mean over draws. For the flows fitted with ``n_bins=17`` the package's own
figure ``est.bits_per_dim(X_test)`` (one deterministic, row-hashed noise draw
per row) is given as well; the two must agree up to the noise.

Models
------
* GaussianMixture: tuned on an 80 / 20 split of one dequantised draw of the
  training images (``default_rng(0)``) over ``covariance_type`` x
  ``n_components`` x ``reg_covar`` (grid below), refitted with the best
  setting on the whole draw.
* KernelDensity (Gaussian kernel): bandwidth tuned on the same split, refitted.
* ResidualFlowDensity, multiscale convolutional flow on the ``(n, 8, 8)``
  integer arrays with ``n_bins=17`` (fresh dequantisation noise each batch), at
  the package defaults (``--flows resflow-conv-tuned`` adds the previous
  page's tuned setting).
* ResidualFlowDensity, tabular MLP flow on the flattened ``(n, 64)`` rows with
  ``n_bins=17``. (``--flows resflow-mlp-predequantised`` also fits it on
  pre-dequantised continuous rows, the work-around used before commit e30255b
  fixed the n_bins standardisation.)

Also measured: seconds to fit, to score the 297 test images with the package
(``bits_per_dim``), and to draw 64 samples; a picture of 64 samples per model
next to 64 real test digits; and, on the fitted convolutional flow, the
per-row standard deviation and the bias of the unbiased log-det estimator
(``n_exact_terms`` in 2, 10, 20; 1 or 4 Gaussian probes; Rademacher probes
with 20 terms) against the exact log-det.

Usage::

    python benchmarks/bench_digits.py              # everything, writes docs/
    python benchmarks/bench_digits.py --quick --no-write   # smoke test
    python benchmarks/bench_digits.py --select '{"n_blocks": 2}'  # selection
    python benchmarks/bench_digits.py --select '{"factor_out": true}'

Threads: one torch / BLAS thread by default (``--threads``). On a shared
2-core machine two threads were several times *slower* than one.
"""

import argparse
import copy
import datetime
import hashlib
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
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KernelDensity
from threadpoolctl import threadpool_limits

from skresflow import ResidualFlowDensity
from skresflow.datasets import load_digits_images

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
K = 17  # grey levels
D = 64  # pixels
LOG_K = D * math.log(K)  # 64 log 17: density on [0,1)^64 -> discrete bound

N_TEST_DRAWS = 3
N_TAB_DRAWS = 4
N_SAMPLES = 64

GMM_GRID = {
    "full": ([1, 3, 5, 8, 10, 15, 20], [1e-4, 1e-3, 1e-2]),
    "diag": ([10, 20, 40, 60, 80, 120], [1e-4, 1e-3]),
    "tied": ([1, 10, 20, 40], [1e-4, 1e-3]),
    "spherical": ([20, 40, 80], [1e-4]),
}
KDE_BANDWIDTHS = np.round(np.logspace(-1.5, -0.7, 17), 5)

# Flow settings. "kind": conv (n, 8, 8) with n_bins=17; mlp_bins (n, 64) with
# n_bins=17; mlp_cont (n, 64) pre-dequantised, no n_bins.
FLOWS = [
    {
        "name": "resflow-conv-defaults",
        "kind": "conv",
        "params": {},
        "note": "package defaults (hidden_channels=32, 2 blocks/scale, 3 scales, "
        "2 FC blocks of (128, 128), learning_rate='auto' = 3e-3, batch 256, "
        "max_iter='auto' = 600 steps, validation_fraction=0.1, validation "
        "every ~50 steps, early stopping)",
    },
    {
        "name": "resflow-mlp",
        "kind": "mlp_bins",
        "params": {
            "learning_rate": 3e-3,
            "max_iter": 160,
            "validation_fraction": 0.0,
            "n_iter_no_change": None,
        },
        "note": "tabular MLP flow (defaults: 8 blocks, hidden_dims (32, 32)) on the "
        "flattened (n, 64) rows with n_bins=17; learning_rate=3e-3, max_iter=160, "
        "validation_fraction=0, n_iter_no_change=None",
    },
]

# Not run by default (select with --flows): the previous page's tuned conv flow
# (kept to compare with the new defaults), and the work-around used while the
# n_bins tabular path was broken (before commit e30255b).
EXTRA_FLOWS = [
    {
        "name": "resflow-conv-tuned",
        "kind": "conv",
        "params": {
            "hidden_channels": 32,
            "n_blocks": 4,
            "learning_rate": 3e-3,
            "max_iter": 100,
            "validation_fraction": 0.0,
            "n_iter_no_change": None,
        },
        "note": "the previous page's tuned flow: hidden_channels=32, n_blocks=4, "
        "learning_rate=3e-3, max_iter=100 (600 steps), validation_fraction=0, "
        "n_iter_no_change=None (the last epoch is kept)",
    },
    {
        "name": "resflow-mlp-predequantised",
        "kind": "mlp_cont",
        "params": {
            "learning_rate": 3e-3,
            "max_iter": 20,
            "validation_fraction": 0.0,
            "n_iter_no_change": None,
        },
        "note": f"tabular MLP flow (defaults) on {N_TAB_DRAWS} stacked "
        "dequantised copies of the training rows (no n_bins), lr 3e-3, 20 "
        "epochs, no validation / early stopping",
    },
]

STD_ROWS = 20
STD_SEEDS = 30
STD_TERMS = (2, 10, 20)
STD_PROBES = (1, 4)


# ----------------------------------------------------------------------- helpers
def bpd(log_p):
    """bits/dim of the discrete images from log-densities on [0, 1)^64."""
    return float(-(np.mean(log_p) - LOG_K) / (D * math.log(2)))


def dequantise(X_int, seed):
    rng = np.random.default_rng(seed)
    X = X_int.reshape(len(X_int), D).astype(np.float64)
    return (X + rng.uniform(size=X.shape)) / K


def quantise(Y):
    return np.clip(np.floor(np.asarray(Y).reshape(-1, D) * K), 0, K - 1).reshape(
        -1, 8, 8
    )


def flow_log_prob(flow, Y, *, image, chunk=64):
    """log p(y) of a fitted skresflow Flow on (n, 64) rows, with its configured
    (scoring) estimator."""
    out = []
    with torch.no_grad():
        for s in range(0, len(Y), chunk):
            y = torch.tensor(Y[s : s + chunk], dtype=torch.float64)
            if image:
                y = y.reshape(-1, 1, 8, 8)
            out.append(flow.log_prob(y).numpy())
    return np.concatenate(out)


def sh(cmd):
    try:
        return subprocess.run(
            cmd, shell=True, capture_output=True, text=True, cwd=ROOT, timeout=20
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def code_hash():
    h = hashlib.sha256()
    for p in sorted((ROOT / "skresflow").rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def machine_info():
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def load_avg():
    return [round(x, 2) for x in os.getloadavg()]


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def warn_summary(caught):
    msgs = {}
    for w in caught:
        key = f"{w.category.__name__}: {str(w.message)[:200]}"
        msgs[key] = msgs.get(key, 0) + 1
    return [f"{k} (x{n})" if n > 1 else k for k, n in msgs.items()]


# --------------------------------------------------------------------- baselines
def run_gmm(Ytr, test_draws, quick):
    a, b = train_test_split(Ytr, test_size=0.2, random_state=0)
    grid = GMM_GRID
    if quick:
        grid = {"full": ([1, 5], [1e-3]), "diag": ([10], [1e-4])}
    scores = []
    with Timer() as tune:
        for cov, (ks, regs) in grid.items():
            for k in ks:
                for reg in regs:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        g = GaussianMixture(
                            k, covariance_type=cov, reg_covar=reg, random_state=0
                        ).fit(a)
                    scores.append(
                        {
                            "covariance_type": cov,
                            "n_components": k,
                            "reg_covar": reg,
                            "val_bpd": bpd(g.score_samples(b)),
                        }
                    )
    best = min(scores, key=lambda r: r["val_bpd"])
    params = {k: best[k] for k in ("covariance_type", "n_components", "reg_covar")}
    with Timer() as fit:
        gmm = GaussianMixture(**params, random_state=0).fit(Ytr)
    per_draw = [bpd(gmm.score_samples(Y)) for Y in test_draws]
    with Timer() as samp:
        S = gmm.sample(N_SAMPLES)[0]
    # GaussianMixture.sample returns the draws grouped by component: shuffle
    # them for the picture.
    S = S[np.random.default_rng(0).permutation(len(S))]
    return {
        "name": "GaussianMixture",
        "settings": ", ".join(f"{k}={v}" for k, v in params.items()),
        "test_bpd": float(np.mean(per_draw)),
        "test_bpd_per_draw": per_draw,
        "fit_s": fit.s,
        "tune_s": tune.s,
        "sample_s": samp.s,
        "val_grid": scores,
    }, quantise(S)


def run_kde(Ytr, test_draws, quick):
    a, b = train_test_split(Ytr, test_size=0.2, random_state=0)
    bws = KDE_BANDWIDTHS[::4] if quick else KDE_BANDWIDTHS
    scores = []
    with Timer() as tune:
        for bw in bws:
            kd = KernelDensity(bandwidth=float(bw)).fit(a)
            scores.append({"bandwidth": float(bw), "val_bpd": bpd(kd.score_samples(b))})
    best = min(scores, key=lambda r: r["val_bpd"])
    with Timer() as fit:
        kde = KernelDensity(bandwidth=best["bandwidth"]).fit(Ytr)
    per_draw = [bpd(kde.score_samples(Y)) for Y in test_draws]
    with Timer() as samp:
        S = kde.sample(N_SAMPLES, random_state=0)
    return {
        "name": "KernelDensity",
        "settings": f"gaussian kernel, bandwidth={best['bandwidth']:.4g}",
        "test_bpd": float(np.mean(per_draw)),
        "test_bpd_per_draw": per_draw,
        "fit_s": fit.s,
        "tune_s": tune.s,
        "sample_s": samp.s,
        "val_grid": scores,
    }, quantise(S)


# ------------------------------------------------------------------------- flows
def temperature_samples(est, temperature, n, seed=0):
    """Samples from z ~ N(0, T^2 I) pushed through the inverse flow (not a
    package feature; for the picture only)."""
    g = torch.Generator().manual_seed(seed)
    z = temperature * torch.randn(
        (n, *est.flow_.latent_shape), generator=g, dtype=torch.float64
    )
    with torch.no_grad():
        y = est.flow_.inverse(z)
    return quantise(y.numpy())


def run_flow(cfg, Xtr, Xte, test_draws, quick):
    params = dict(cfg["params"])
    if quick:
        params["max_iter"] = 1
    kind = cfg["kind"]
    n = len(Xtr)
    if kind == "conv":
        est = ResidualFlowDensity(n_bins=K, random_state=0, **params)
        X_fit = Xtr.astype(np.float64)
    elif kind == "mlp_bins":
        est = ResidualFlowDensity(n_bins=K, random_state=0, **params)
        X_fit = Xtr.reshape(n, D).astype(np.float64)
    else:
        est = ResidualFlowDensity(random_state=0, **params)
        X_fit = np.concatenate([dequantise(Xtr, 10 + j) for j in range(N_TAB_DRAWS)])
    print(f"[{cfg['name']}] fitting {est!r} on {X_fit.shape}", flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu0 = time.process_time()
        with Timer() as fit:
            est.fit(X_fit)
        fit_cpu = time.process_time() - cpu0
        image = kind == "conv"
        res = {
            "name": cfg["name"],
            "kind": kind,
            "settings": cfg["note"],
            "params": {k: v for k, v in est.get_params().items()},
            "fit_s": fit.s,
            "fit_cpu_s": fit_cpu,
            "n_iter": est.n_iter_,
            "epoch_s": float(np.mean([h["seconds"] for h in est.history_])),
            "history": est.history_,
            "logdet_estimator_": est.logdet_estimator_,
        }
        with Timer() as sc:
            per_draw = [
                bpd(flow_log_prob(est.flow_, Y, image=image)) for Y in test_draws
            ]
        res["test_bpd_per_draw"] = per_draw
        res["test_bpd"] = float(np.mean(per_draw))
        res["shared_noise_score_s_per_draw"] = sc.s / len(test_draws)
        if kind != "mlp_cont":
            X_pkg = Xte.astype(np.float64)
            if kind == "mlp_bins":
                X_pkg = X_pkg.reshape(len(Xte), D)
            with Timer() as sc:
                res["package_bpd"] = est.bits_per_dim(X_pkg)
            res["score_s"] = sc.s
            res["scoring_estimator_"] = est.scoring_estimator_
        else:
            with Timer() as sc:
                est.score_samples(test_draws[0])
            res["score_s"] = sc.s
            res["scoring_estimator_"] = est.scoring_estimator_
        samples = None
        try:
            with Timer() as samp:
                S = est.sample(N_SAMPLES, random_state=0)
        except Exception as exc:  # noqa: BLE001  (recorded, not hidden)
            res["sample_error"] = f"{type(exc).__name__}: {exc}"
            print(f"[{cfg['name']}] sample failed: {res['sample_error']}", flush=True)
        else:
            res["sample_s"] = samp.s
            # n_bins models return integers 0..16; the continuous one [0, 1).
            samples = quantise(S) if kind == "mlp_cont" else S.reshape(-1, 8, 8)
            res["sample_raw_range"] = [float(np.min(S)), float(np.max(S))]
        res["max_block_lipschitz"] = float(
            max(b.estimated_lipschitz() for b in est.flow_.blocks)
        )
    res["warnings"] = warn_summary(caught)
    print(
        f"[{cfg['name']}] fit {fit.s:.0f}s ({fit_cpu:.0f} s CPU), "
        f"{est.n_iter_} epochs, test bpd "
        f"{res['test_bpd']:.4f} (package: {res.get('package_bpd', float('nan')):.4f})",
        flush=True,
    )
    return res, samples, est


# --------------------------------------------------------------- estimator spread
def run_std(est, Y, quick):
    """Spread of the unbiased log-det estimator on the fitted conv flow."""
    rows = 4 if quick else STD_ROWS
    seeds = 3 if quick else STD_SEEDS
    terms = (2, 20) if quick else STD_TERMS
    flow = copy.deepcopy(est.flow_)  # the fitted model's configuration is untouched
    x = torch.tensor(Y[:rows], dtype=torch.float64).reshape(rows, 1, 8, 8)
    with torch.no_grad(), Timer() as t_exact:
        exact = flow.log_prob(x).numpy()
    out = {
        "rows": rows,
        "seeds": seeds,
        "exact_s_per_row": t_exact.s / rows,
        "exact_bpd_of_rows": bpd(exact),
        "configs": [],
    }
    combos = [(n, k, "gaussian") for n in terms for k in STD_PROBES]
    combos += [(terms[-1], k, "rademacher") for k in STD_PROBES]
    for n_terms, k, probe in combos:
        flow.configure_logdet(
            estimator="unbiased",
            n_exact_terms=n_terms,
            probe_sharing="per_sample",
            n_probes=k,
            probe=probe,
            grad="naive",
        )
        vals = []
        with torch.no_grad(), Timer() as t:
            for s in range(seeds):
                g = torch.Generator().manual_seed(s)
                vals.append(flow.log_prob(x, g).numpy())
        vals = np.array(vals)  # (seeds, rows)
        diff = vals - exact
        row_std = vals.std(0, ddof=1)
        seed_means = diff.mean(1)
        rec = {
            "n_exact_terms": n_terms,
            "n_probes": k,
            "probe": probe,
            "median_row_std_nats": float(np.median(row_std)),
            "max_row_std_nats": float(np.max(row_std)),
            "median_row_std_bpd": float(np.median(row_std) / (D * math.log(2))),
            "bias_nats": float(diff.mean()),
            "bias_se_nats": float(seed_means.std(ddof=1) / math.sqrt(seeds)),
            "mean_abs_err_nats": float(np.abs(diff).mean()),
            "s_per_row": t.s / (seeds * rows),
        }
        out["configs"].append(rec)
        print(f"[std] {rec}", flush=True)
    # The package's own high-dimensional scorer: 20 exact terms, 4 row-hashed
    # probes, fixed seed 0: deterministic per row, whatever the batch.
    flow.configure_logdet(
        estimator="unbiased",
        n_exact_terms=20,
        probe_sharing="row_hash",
        n_probes=4,
        probe="gaussian",
        grad="naive",
    )
    with torch.no_grad():
        a = flow.log_prob(x, torch.Generator().manual_seed(0)).numpy()
        perm = torch.arange(rows - 1, -1, -1)
        b = flow.log_prob(x[perm], torch.Generator().manual_seed(0)).numpy()[
            perm.argsort()
        ]
        c = np.concatenate(
            [
                flow.log_prob(x[i : i + 1], torch.Generator().manual_seed(0)).numpy()
                for i in range(min(rows, 4))
            ]
        )
    out["package_scorer"] = {
        "max_abs_diff_reversed_batch": float(np.abs(a - b).max()),
        "max_abs_diff_one_row_calls": float(np.abs(a[: len(c)] - c).max()),
        "mean_err_vs_exact_nats": float((a - exact).mean()),
        "rms_err_vs_exact_nats": float(np.sqrt(((a - exact) ** 2).mean())),
    }
    print(f"[std] package scorer {out['package_scorer']}", flush=True)
    return out


# ------------------------------------------------------------------------ figure
def save_figure(panels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 4
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.9 * nrows))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes[len(panels) :]:
        ax.axis("off")
    for ax, (title, imgs) in zip(axes, panels, strict=False):
        imgs = np.asarray(imgs)[:64].reshape(-1, 8, 8)
        grid = np.full((8 * 9 + 1, 8 * 9 + 1), np.nan)
        for i, im in enumerate(imgs):
            r, c = divmod(i, 8)
            grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = im
        cmap = matplotlib.colormaps["gray_r"].copy()
        cmap.set_bad("#9fb8d0")
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=16, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------- docs
BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def render(meta, rows, std):
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        BEGIN,
        "",
        f"Generated by `{meta['command']}` on {meta['date']}.",
        "",
        f"Machine: {meta['machine']['nproc']} CPUs ({meta['machine']['cpu']}), "
        f"torch {meta['machine']['torch']}, Python {meta['machine']['python']}, "
        f"{meta['threads']} torch/BLAS thread(s); load average at start "
        f"{', '.join(map(str, meta['load_start']))}, at end "
        f"{', '.join(map(str, meta['load_end']))} (machine shared with other jobs: "
        f"times are noisy); total wall time {meta['total_s']:.0f} s.",
        "",
        f"Code: skresflow at commit {meta['commit_start']} "
        f"(skresflow/ {'with' if meta['dirty_start'] else 'without'} uncommitted "
        f"changes) at the start; hash of skresflow/**/*.py {meta['code_hash_start']} "
        f"at the start, {meta['code_hash_end']} at the end"
        + (
            " (**the package changed during the run**)."
            if meta["code_hash_start"] != meta["code_hash_end"]
            else " (unchanged during the run)."
        ),
        "",
        "Test bits/dim: mean over the same "
        f"{N_TEST_DRAWS} dequantisation draws of the 297 test images for every "
        "model (lower is better; 4.087 = uniform). *package*: "
        "`est.bits_per_dim(X_test)` with the flow's own row-hashed noise. "
        "Fit s: wall-clock seconds of the refit for GMM / KDE (tuning "
        "separately), of the whole `fit` for flows; fit CPU s: CPU time of the "
        "fitting process (`time.process_time`, one thread), less sensitive to "
        "the load. "
        "Score s: the package scoring the 297 test images once. "
        "Sample s: 64 samples.",
        "",
        "| model | settings | test bits/dim | (per draw) | package bits/dim | "
        "epochs | s/epoch | fit s | fit CPU s | tune s | score s | sample s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        draws = " / ".join(
            f"{v:.3f}" if v < 1e4 else f"{v:.3g}" for v in r["test_bpd_per_draw"]
        )
        tb = r["test_bpd"]
        tbs = (
            f"**{tb:.3f}**"
            if r.get("best")
            else (f"{tb:.3f}" if tb < 1e4 else f"{tb:.3g}")
        )
        pb = r.get("package_bpd")
        pbs = "-" if pb is None else (f"{pb:.3f}" if pb < 1e4 else f"{pb:.3g}")
        lines.append(
            f"| {r['name']} | {r['settings']} | {tbs} | {draws} | {pbs} | "
            f"{r.get('n_iter', '-')} | {f(r.get('epoch_s'), 1)} | "
            f"{f(r['fit_s'], 1)} | {f(r.get('fit_cpu_s'), 1)} | "
            f"{f(r.get('tune_s'), 1)} | "
            f"{f(r.get('score_s'), 1)} | {f(r.get('sample_s'), 1)} |"
        )
    lines += ["", "Warnings raised while fitting / scoring / sampling the flows:", ""]
    for r in rows:
        for w in r.get("warnings", []):
            lines.append(f"- {r['name']}: `{w}`")
        if "sample_error" in r:
            lines.append(f"- {r['name']}: sampling failed: `{r['sample_error']}`")
    lines += [
        "",
        "Largest estimated Lipschitz constant of a residual block after fit "
        "(must be < 1): "
        + ", ".join(
            f"{r['name']} {r['max_block_lipschitz']:.4f}"
            for r in rows
            if "max_block_lipschitz" in r
        )
        + ".",
    ]
    if std is not None:
        lines += [
            "",
            f"Unbiased log-det estimator on the fitted `{std['model']}` flow: "
            f"{std['rows']} test images (first dequantisation draw), "
            f"{std['seeds']} `torch.Generator` seeds each, `probe_sharing="
            '"per_sample"`, geometric(0.5) roulette after `n_exact_terms`. '
            f"Exact log-det scoring costs {std['exact_s_per_row']:.3f} s per image. "
            "Row std: standard deviation over seeds of one image's log p, median "
            "(max) over images. Bias: mean of (estimate - exact) over seeds and "
            "images, +- standard error over seeds.",
            "",
            "| n_exact_terms | probes | probe | row std, nats (median) | (max) | "
            "row std, bits/dim | bias, nats | mean abs error, nats | s per image |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in std["configs"]:
            lines.append(
                f"| {c['n_exact_terms']} | {c['n_probes']} | {c['probe']} | "
                f"{c['median_row_std_nats']:.4f} | {c['max_row_std_nats']:.4f} | "
                f"{c['median_row_std_bpd']:.2e} | {c['bias_nats']:+.4f} +- "
                f"{c['bias_se_nats']:.4f} | {c['mean_abs_err_nats']:.4f} | "
                f"{c['s_per_row']:.3f} |"
            )
        p = std["package_scorer"]
        lines += [
            "",
            "The package's high-dimensional scorer (20 exact terms, 4 row-hashed "
            "probes, fixed seed) on the same images: max |difference| when the "
            f"batch is reversed {p['max_abs_diff_reversed_batch']:.1e} nats, when "
            f"each image is scored alone {p['max_abs_diff_one_row_calls']:.1e} "
            f"nats; error vs exact: mean {p['mean_err_vs_exact_nats']:+.4f}, RMS "
            f"{p['rms_err_vs_exact_nats']:.4f} nats.",
        ]
    lines += ["", END]
    return "\n".join(lines)


def write_docs(meta, rows, std):
    md = DOCS / "digits.md"
    block = render(meta, rows, std)
    if md.exists():
        text = md.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            md.write_text(head + block + tail)
            return
    md.write_text(
        "# Digits: Residual Flow vs GaussianMixture and KernelDensity\n\n"
        + block
        + "\n"
    )


# ---------------------------------------------------------------------- selection
def run_selection(params):
    """Fit one conv setting on 1,200 training images and score the other 300.

    The protocol of "How the image defaults were chosen" (docs/benchmarks/
    digits.md): the test images are never touched.
    """
    X, _ = load_digits_images()
    Xtr, _ = train_test_split(X, test_size=297, random_state=0)
    Xfit, Xval = train_test_split(Xtr, test_size=300, random_state=1)
    est = ResidualFlowDensity(n_bins=K, random_state=0, **params)
    cpu0, t0 = time.process_time(), time.perf_counter()
    est.fit(Xfit.astype(np.float64))
    fit_cpu, fit_wall = time.process_time() - cpu0, time.perf_counter() - t0
    return {
        "params": params,
        "val_bpd": est.bits_per_dim(Xval.astype(np.float64)),
        "fit_cpu_s": fit_cpu,
        "fit_wall_s": fit_wall,
        "n_iter": est.n_iter_,
        "load": load_avg(),
    }


# -------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (no write)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--flows", nargs="*", default=None, help="subset of FLOWS names")
    ap.add_argument("--no-std", action="store_true")
    ap.add_argument(
        "--select",
        metavar="JSON",
        help="only fit this conv setting (estimator parameters as JSON) on a "
        "validation split of the training images and print its bits/dim",
    )
    args = ap.parse_args()
    if args.select is not None:
        torch.set_num_threads(args.threads)
        with threadpool_limits(args.threads):
            print(json.dumps(run_selection(json.loads(args.select))), flush=True)
        return
    if args.quick:
        args.no_write = True  # a smoke run never overwrites the published results

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "threads": args.threads,
        "load_start": load_avg(),
        "uptime_start": sh("uptime"),
        "commit_start": sh("git rev-parse --short HEAD"),
        "dirty_start": bool(sh("git status --porcelain skresflow")),
        "code_hash_start": code_hash(),
    }
    print(meta, flush=True)

    X, _ = load_digits_images()
    Xtr, Xte = train_test_split(X, test_size=297, random_state=0)
    if args.quick:
        Xte = Xte[:40]
    Ytr = dequantise(Xtr, 0)
    n_draws = 1 if args.quick else N_TEST_DRAWS
    test_draws = [dequantise(Xte, 1000 + j) for j in range(n_draws)]

    rows, panels, ests = [], {}, {}
    with threadpool_limits(args.threads):
        for runner in (run_gmm, run_kde):
            r, S = runner(Ytr, test_draws, args.quick)
            rows.append(r)
            panels[r["name"]] = S
            print(
                f"[{r['name']}] {r['settings']}: test bpd {r['test_bpd']:.4f}",
                flush=True,
            )
        flows = (
            FLOWS
            if not args.flows
            else [c for c in FLOWS + EXTRA_FLOWS if c["name"] in args.flows]
        )
        for cfg in flows:
            r, S, est = run_flow(cfg, Xtr, Xte, test_draws, args.quick)
            rows.append(r)
            ests[cfg["name"]] = est
            if S is not None:
                panels[cfg["name"]] = S

        finite = [r for r in rows if np.isfinite(r["test_bpd"])]
        min(finite, key=lambda r: r["test_bpd"])["best"] = True
        conv = [r for r in rows if r.get("kind") == "conv"]
        std = None
        if conv and not args.no_std:
            best_conv = min(conv, key=lambda r: r["test_bpd"])
            std = run_std(ests[best_conv["name"]], test_draws[0], args.quick)
            std["model"] = best_conv["name"]
            panels["resflow-conv, temperature 0.7"] = temperature_samples(
                ests[best_conv["name"]], 0.7, N_SAMPLES
            )

    order = [
        n
        for n in (
            "resflow-conv-defaults",
            "resflow-conv, temperature 0.7",
            "resflow-conv-tuned",
            "resflow-mlp",
            "resflow-mlp-predequantised",
            "GaussianMixture",
            "KernelDensity",
        )
        if n in panels
    ]
    fig_panels = [(n, panels[n]) for n in order]
    fig_panels.append(("real test digits", Xte[:N_SAMPLES]))

    meta["total_s"] = time.perf_counter() - t_start
    meta["load_end"] = load_avg()
    meta["uptime_end"] = sh("uptime")
    meta["commit_end"] = sh("git rev-parse --short HEAD")
    meta["code_hash_end"] = code_hash()
    result = {
        "meta": meta,
        "models": rows,
        "std": std,
        "samples": {k: np.asarray(v).astype(int).tolist() for k, v in panels.items()},
    }
    if not args.no_write:
        DOCS.mkdir(parents=True, exist_ok=True)
        save_figure(fig_panels, DOCS / "digits_samples.png")
        (DOCS / "digits_results.json").write_text(
            json.dumps(result, indent=1, default=str)
        )
        write_docs(meta, rows, std)
    else:
        save_figure(fig_panels, Path("/tmp/digits_samples_quick.png"))
        print(render(meta, rows, std))
    print(f"total {meta['total_s']:.0f} s; load {meta['load_end']}", flush=True)


if __name__ == "__main__":
    main()
