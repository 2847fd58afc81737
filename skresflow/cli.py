"""Command line: ``skresflow demo`` (more subcommands arrive with the CLI issue)."""

import argparse
import sys
import time


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
    except (ValueError, OSError) as exc:
        print(f"skresflow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
