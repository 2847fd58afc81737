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


def _demo(args):
    from sklearn.mixture import GaussianMixture
    from sklearn.model_selection import train_test_split

    from . import ResidualFlowDensity
    from .datasets import make_toy

    X = make_toy(args.data, args.n_samples, random_state=0)
    X_train, X_test = train_test_split(X, test_size=0.25, random_state=0)
    print(f"data: {args.data}, {len(X_train)} training and {len(X_test)} test rows")
    t0 = time.perf_counter()
    flow = ResidualFlowDensity(
        random_state=0, verbose=args.verbose, max_iter=args.max_iter
    ).fit(X_train)
    seconds = time.perf_counter() - t0
    print(
        f"ResidualFlowDensity: test log-likelihood {flow.score(X_test):.4f} nats/row "
        f"({flow.n_iter_} epochs, {seconds:.1f} s)"
    )
    X_fit, X_val = train_test_split(X_train, test_size=0.2, random_state=0)
    best = max(
        range(1, 31),
        key=lambda k: GaussianMixture(k, random_state=0).fit(X_fit).score(X_val),
    )
    gmm = GaussianMixture(best, random_state=0).fit(X_train)
    print(
        f"GaussianMixture(n_components={best}, tuned on validation): test "
        f"log-likelihood {gmm.score(X_test):.4f} nats/row"
    )
    return 0


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
    fit.add_argument("--max-iter", type=int, default=100)
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

    demo = sub.add_parser("demo", help="fit a 2-D toy density and compare with a GMM")
    demo.add_argument("--data", default="8gaussians", choices=TOY_DATASETS)
    demo.add_argument("--n-samples", type=int, default=4000)
    demo.add_argument("--max-iter", type=int, default=100)
    demo.add_argument("--verbose", type=int, default=1)
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
