"""LipSwish vs ELU vs softplus: held-out bits/dim on digits (the ablation, part 2).

``ResidualFlowDensity(n_bins=17)`` on sklearn's 8x8 digits as 64 integer
features (``load_digits_images`` flattened; the fixed 1,500 / 297 split of
``benchmarks/bench_hybrid.py``), the same flow (4 blocks of (64, 64)), budget
(40 epochs, learning rate 3e-3, no early stopping) and unbiased training
estimator for every activation; only the activation changes. Held-out bits/dim
(dequantisation bound; scored with exact log-determinants), mean and standard
deviation over ``--seeds`` (``random_state``).

Runtime (measured, 1 thread, 2-core AMD EPYC shared with other jobs): about
1 minute (62 s; 6-9 s per fit) with the defaults; ``--quick`` about 10 seconds.

    python experiments/exp_activations_digits.py
    python experiments/exp_activations_digits.py --seeds 0 1 2 3 4 --max-iter 100
"""

import json
import time

import numpy as np
from _common import digits_args, pyplot, save_results, setup
from sklearn.model_selection import train_test_split

from skresflow import ResidualFlowDensity
from skresflow.datasets import load_digits_images

ACTIVATIONS = ["lipswish", "elu", "softplus"]


def parse_args(argv=None):
    return digits_args(__doc__.splitlines()[0], "activations_digits", argv)


def run(activation, seed, data, args):
    Xtr, Xte = data
    t0 = time.perf_counter()
    est = ResidualFlowDensity(
        n_bins=17,
        activation=activation,
        n_blocks=args.n_blocks,
        hidden_dims=(args.hidden, args.hidden),
        logdet_estimator="unbiased",
        learning_rate=3e-3,
        max_iter=args.max_iter,
        validation_fraction=0.0,
        n_iter_no_change=None,
        random_state=seed,
    ).fit(Xtr)
    row = {
        "activation": activation,
        "seed": seed,
        "bits_per_dim": float(est.bits_per_dim(Xte)),
        "fit_seconds": time.perf_counter() - t0,
    }
    print(
        f"{activation:>9} seed={seed}: {row['bits_per_dim']:.3f} bits/dim "
        f"({row['fit_seconds']:.0f} s)"
    )
    return row


def summarise(runs):
    table = []
    for act in ACTIVATIONS:
        v = [r["bits_per_dim"] for r in runs if r["activation"] == act]
        std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        table.append(
            {
                "activation": act,
                "mean": float(np.mean(v)),
                "std": std,
                "n_seeds": len(v),
            }
        )
    return table


def plot(table, args):
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no figure")
        return
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.errorbar(
        range(len(table)),
        [r["mean"] for r in table],
        yerr=[r["std"] for r in table],
        fmt="o",
        capsize=4,
    )
    ax.set_xticks(range(len(table)), [r["activation"] for r in table])
    ax.set(title="digits", ylabel="held-out bits/dim (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{args.out}.png", dpi=100)
    print(f"wrote {args.out}.png")


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        with open(f"{args.out}.json") as f:
            return plot(json.load(f)["summary"], args)
    setup(args.seeds[0])
    images, y = load_digits_images()
    X = images.reshape(len(images), -1)
    Xtr, Xte, _, _ = train_test_split(X, y, test_size=297, random_state=0)
    t0 = time.perf_counter()
    runs = [run(a, s, (Xtr, Xte), args) for s in args.seeds for a in ACTIVATIONS]
    table = summarise(runs)
    for e in table:
        print(f"{e['activation']:>9}: {e['mean']:.3f} +- {e['std']:.3f} bits/dim")
    save_results(__file__, args, t0, summary=table, runs=runs)
    plot(table, args)


if __name__ == "__main__":
    main()
