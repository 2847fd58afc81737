"""Command line for skresflow: fit, score, sample, info and demo.

Run ``skresflow COMMAND --help`` for the options of each command.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _read_data(spec, n_samples, random_state):
    """DATA: a .npy or .csv file, or a built-in data set name."""
    from .datasets import TOY_DATASETS, load_digits_images, make_toy

    if spec == "digits":
        return load_digits_images()[0].astype(np.float64), 17
    if spec in TOY_DATASETS:
        return make_toy(spec, n_samples, random_state=random_state), None
    path = Path(spec)
    if not path.exists():
        names = ", ".join(("digits", *TOY_DATASETS))
        raise ValueError(
            f"{spec}: no such file, and not a built-in data set ({names})."
        )
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    if path.suffix == ".csv":
        return np.loadtxt(path, delimiter=",", ndmin=2), None
    raise ValueError(f"{spec}: data files must end in .npy or .csv.")


def _fit(args):
    from . import ResidualFlowDensity

    X, n_bins = _read_data(args.data, args.n_samples, args.random_state)
    params = {
        "max_iter": args.max_iter,
        "random_state": args.random_state,
        "device": args.device,
        "verbose": args.verbose,
        "n_bins": args.n_bins if args.n_bins is not None else n_bins,
    }
    if args.n_blocks is not None:
        params["n_blocks"] = args.n_blocks
    t0 = time.perf_counter()
    est = ResidualFlowDensity(**params).fit(X)
    est.save(args.out)
    print(
        f"fitted {X.shape} in {time.perf_counter() - t0:.1f} s ({est.n_iter_} "
        f"epochs); mean log-likelihood {est.score(X):.4f}; saved to {args.out}"
    )
    return 0


def _score(args):
    from . import load

    est = load(args.model)
    X, _ = _read_data(args.data, args.n_samples, args.random_state)
    scores = est.score_samples(X)
    if args.out:
        np.save(args.out, scores) if args.out.endswith(".npy") else np.savetxt(
            args.out, scores
        )
    summary = (
        f"{len(scores)} rows: mean log-likelihood {scores.mean():.4f} "
        f"(std {scores.std():.4f}, min {scores.min():.4f}, max {scores.max():.4f})"
    )
    if est.n_bins is not None:
        summary += f"; {est.bits_per_dim(X):.4f} bits/dim"
    print(summary)
    return 0


def _sample(args):
    from . import load

    est = load(args.model)
    X = est.sample(args.n, random_state=args.random_state)
    out = Path(args.out)
    if out.suffix == ".png":
        _save_grid(X, est, out)
    elif out.suffix == ".csv":
        np.savetxt(out, X.reshape(len(X), -1), delimiter=",")
    else:
        np.save(out, X)
    print(f"wrote {args.n} samples to {out}")
    return 0


def _save_grid(X, est, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "writing .png needs matplotlib (pip install "
            "'skresflow[plot]'); use .npy instead."
        ) from None
    if len(est.event_shape_) != 3:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(X[:, 0], X[:, 1], s=2)
    else:
        images = (
            X.reshape(len(X), *est.event_shape_[1:])
            if est.event_shape_[0] == 1
            else np.moveaxis(X.reshape(len(X), *est.event_shape_), 1, -1)
        )
        cols = int(np.ceil(np.sqrt(len(images))))
        rows = int(np.ceil(len(images) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
        for ax, image in zip(axes.ravel(), images, strict=False):
            ax.imshow(image, cmap="gray_r")
        for ax in axes.ravel():
            ax.axis("off")
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _info(args):
    from . import load

    est = load(args.model)
    info = {
        "class": type(est).__name__,
        "params": {k: v for k, v in est.get_params().items()},
        "row_shape": list(est.event_shape_),
        "epochs": est.n_iter_,
        "final_train_loss": est.history_[-1]["train_loss"] if est.history_ else None,
        "best_val_loss": min(
            (h["val_loss"] for h in est.history_ if "val_loss" in h), default=None
        ),
        "training_logdet": est.logdet_estimator_,
        "scoring_logdet": est.scoring_estimator_,
        "lipschitz_bounds": [round(b, 4) for b in est.flow_.lipschitz_bounds()],
    }
    print(json.dumps(info, indent=2, default=str))
    return 0


# The demo's flow: the tabular MLP flow on the flattened 8x8 digits, with the
# settings of the "resflow-mlp" row of docs/benchmarks/digits.md (pinned here so
# that the demo does not change when the package defaults do). No validation
# split: per-epoch validation scoring would cost more than the training itself.
DEMO_FLOW = {
    "n_bins": 17,
    "n_blocks": 8,
    "hidden_dims": (128, 128),
    "learning_rate": 3e-3,
    "batch_size": 256,
    "validation_fraction": 0.0,
    "n_iter_no_change": None,
}
DEMO_QUICK_ENV = "SKRESFLOW_DEMO_QUICK"  # "1": tiny settings, for the tests
_DEMO_NOTE = """\
How the numbers compare: both models score the same held-out integer images,
in bits per pixel of the discrete digits (log2(17) = {uniform:.3f} for the
uniform distribution). The flow's figure is its dequantisation lower bound on
log P(x) (x + u, u uniform in [0, 1)^64, one fixed noise draw per image). The
GMM is a continuous density too, so it was fitted to dequantised training
images and is scored by the same bound: log P(x) >= E_u log p(x + u), averaged
over {draws} noise draws of the test images. Both are upper bounds on the true
bits/dim of each model; lower is better."""


def _demo(args):
    import os

    import torch
    from sklearn.model_selection import train_test_split

    from .datasets import load_digits_images

    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)  # BLAS too (the GaussianMixture)
    quick = args.quick or os.environ.get(DEMO_QUICK_ENV) == "1"
    images = load_digits_images()[0]
    X_train, X_test = train_test_split(
        images.reshape(len(images), -1), test_size=297, random_state=0
    )
    if quick:
        X_train = X_train[:300]
    print(
        f"digits: {len(X_train)} training and {len(X_test)} held-out 8x8 images, "
        "17 grey levels"
    )
    flow, seconds = _demo_flow(X_train, args, quick)
    print(f"  fitted in {seconds:.0f} s ({flow.n_iter_} epochs)")
    gmm, gmm_bpd = _demo_gmm(X_train, X_test, quick)
    flow_bpd = flow.bits_per_dim(X_test)
    print(
        f"\nheld-out bits/dim (lower is better):\n"
        f"  ResidualFlowDensity  {flow_bpd:.3f}\n"
        f"  GaussianMixture      {np.mean(gmm_bpd):.3f}  "
        f"({gmm.n_components} components, {gmm.covariance_type} covariances, "
        "tuned on validation data)\n"
        f"  uniform              {np.log2(17):.3f}\n"
    )
    print(_DEMO_NOTE.format(uniform=np.log2(17), draws=len(gmm_bpd)))
    _demo_picture(flow, gmm, X_test, args.out)
    return 0


def _demo_flow(X_train, args, quick):
    from . import ResidualFlowDensity

    params = dict(
        DEMO_FLOW,
        max_iter=args.max_iter,
        random_state=0,
        device=args.device,
        verbose=args.verbose,
    )
    if quick:
        params.update(n_blocks=2, hidden_dims=(32,), max_iter=2)
    print(
        f"fitting ResidualFlowDensity({params['n_blocks']} residual blocks, MLP "
        f"{params['hidden_dims']}) for {params['max_iter']} epochs ..."
    )
    t0 = time.perf_counter()
    flow = ResidualFlowDensity(**params).fit(X_train)
    return flow, time.perf_counter() - t0


def _dequantised(X, seed):
    """(x + u) / 17, u ~ U[0, 1): the images as a continuous density sees them."""
    return (X + np.random.default_rng(seed).uniform(size=X.shape)) / 17


def _demo_gmm(X_train, X_test, quick):
    """GaussianMixture tuned on an 80/20 split of dequantised training images.

    Returns the refitted model and its test bits/dim, one per noise draw.
    """
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import train_test_split

    Y = _dequantised(X_train, seed=0)
    Y_fit, Y_val = train_test_split(Y, test_size=0.2, random_state=0)
    # Full covariances overfit beyond ~10 components on 1,200 images (64-D).
    sizes = {"diag": (5, 10, 20, 40, 80), "full": (1, 2, 5, 10)}
    if quick:
        sizes = {"diag": (1, 5)}
    grid = [
        {"covariance_type": cov, "n_components": k, "reg_covar": reg}
        for cov, ks in sizes.items()
        for k in ks
        for reg in (1e-4, 1e-3)
    ]
    print(f"tuning GaussianMixture over {len(grid)} settings ...")
    best = max(
        grid,
        key=lambda p: GaussianMixture(**p, random_state=0).fit(Y_fit).score(Y_val),
    )
    gmm = GaussianMixture(**best, random_state=0).fit(Y)
    d = X_test.shape[1]
    # log p(x + u) = log p_gmm((x + u) / 17) - d log 17 (the rescaling's Jacobian)
    log_p = [
        gmm.score(_dequantised(X_test, 1000 + j)) - d * np.log(17) for j in range(3)
    ]
    return gmm, -np.asarray(log_p) / (d * np.log(2))


def _demo_picture(flow, gmm, X_test, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "\nmatplotlib is not installed: no picture of samples "
            "(pip install matplotlib)."
        )
        return
    rng = np.random.default_rng(0)
    # GaussianMixture.sample returns its draws grouped by component: shuffle.
    gmm_images = np.clip(np.floor(gmm.sample(64)[0] * 17), 0, 16)[rng.permutation(64)]
    panels = {
        "ResidualFlowDensity samples": flow.sample(64, random_state=0),
        "GaussianMixture samples": gmm_images,
        "held-out digits": X_test[:64],
    }
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    for ax, (title, X) in zip(axes, panels.items(), strict=True):
        padded = np.pad(X.reshape(64, 8, 8), ((0, 0), (1, 1), (1, 1)))
        tiles = padded.reshape(8, 8, 10, 10).transpose(0, 2, 1, 3).reshape(80, 80)
        ax.imshow(tiles, cmap="gray_r", vmin=0, vmax=16)
        ax.set_title(title)
        ax.axis("off")
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"\nwrote 64 samples of each model and 64 real digits to {out}")


def _max_iter(text):
    """argparse type of --max-iter: a positive integer or "auto"."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f'must be a positive integer or "auto"; got {text!r}'
        )
    return value


def build_parser():
    from .datasets import TOY_DATASETS

    parser = argparse.ArgumentParser(prog="skresflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p):
        p.add_argument(
            "--n-samples",
            type=int,
            default=4000,
            help="rows drawn for a 2-D toy data set",
        )
        p.add_argument("--random-state", type=int, default=0)

    fit = sub.add_parser("fit", help="fit a ResidualFlowDensity and save it")
    fit.add_argument(
        "data", help=".npy/.csv file or digits, " + ", ".join(TOY_DATASETS)
    )
    fit.add_argument("--out", required=True, help="model file to write")
    fit.add_argument(
        "--max-iter",
        type=_max_iter,
        default="auto",
        help='epochs, or "auto" (about 2,000 optimiser steps, 4,500 up to 8 '
        "features; the default)",
    )
    fit.add_argument("--n-blocks", type=int)
    fit.add_argument("--n-bins", type=int, help="discrete levels (digits: 17)")
    fit.add_argument("--device", default="auto")
    fit.add_argument("--verbose", type=int, default=1)
    data_args(fit)
    fit.set_defaults(func=_fit)

    score = sub.add_parser("score", help="per-row log-likelihood of DATA")
    score.add_argument("model")
    score.add_argument("data")
    score.add_argument("--out", help="write the scores (.npy or text)")
    data_args(score)
    score.set_defaults(func=_score)

    sample = sub.add_parser("sample", help="draw samples from a saved model")
    sample.add_argument("model")
    sample.add_argument("-n", type=int, default=16)
    sample.add_argument("--out", required=True, help=".npy, .csv or .png")
    sample.add_argument("--random-state", type=int, default=None)
    sample.set_defaults(func=_sample)

    info = sub.add_parser("info", help="describe a saved model")
    info.add_argument("model")
    info.set_defaults(func=_info)

    demo = sub.add_parser(
        "demo", help="fit digits and compare bits/dim with a GaussianMixture"
    )
    demo.add_argument("--max-iter", type=int, default=160, help="epochs")
    demo.add_argument(
        "--out",
        default="skresflow_demo.png",
        help="picture of samples (needs matplotlib)",
    )
    demo.add_argument("--device", default="auto")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0: torch's default); one is "
        "fastest for this small model on a shared machine",
    )
    demo.add_argument("--verbose", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("skresflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a command line reports, it does not trace back
        print(f"skresflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
