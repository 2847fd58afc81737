"""Hybrid trade-off on digits: density_weight in {0, 1/D, 1}, several seeds.

``ResidualFlowClassifier(head="linear", n_bins=17)`` on sklearn's 8x8 digits as
64 integer features (``load_digits_images`` flattened; the fixed split of
``benchmarks/bench_hybrid.py``: 1,500 training / 297 held-out images), with the
joint objective ``lambda * log p(x) + log p(y | x)`` for lambda = 0, 1/64
(``"per_dim"``) and 1. Reported per lambda: held-out accuracy and bits/dim
(``bits_per_dim``: dequantisation bound), mean and standard deviation over
seeds (``random_state``). A smaller flow and budget than the benchmark (4
blocks of (64, 64), 40 epochs instead of 8 blocks of (128, 128), 100 epochs) so
that several seeds fit in minutes.

Runtime (measured, 1 thread, 2-core AMD EPYC shared with other jobs): see
3 minutes (181 s; 14-24 s per fit) with the defaults; ``--quick`` about
10 seconds.

    python experiments/exp_hybrid.py
    python experiments/exp_hybrid.py --seeds 0 1 2 3 4 --max-iter 100 --n-blocks 8
"""

import json
import time

import numpy as np
from _common import digits_args, pyplot, save_results, setup
from sklearn.model_selection import train_test_split

from skresflow import ResidualFlowClassifier
from skresflow.datasets import load_digits_images

WEIGHTS = {"0": 0.0, "1/D": "per_dim", "1": 1.0}


def parse_args(argv=None):
    return digits_args(__doc__.splitlines()[0], "hybrid", argv)


def run(weight, seed, data, args):
    Xtr, Xte, ytr, yte = data
    t0 = time.perf_counter()
    clf = ResidualFlowClassifier(
        density_weight=WEIGHTS[weight],
        head="linear",
        n_bins=17,
        n_blocks=args.n_blocks,
        hidden_dims=(args.hidden, args.hidden),
        learning_rate=3e-3,
        max_iter=args.max_iter,
        validation_fraction=0.0,
        n_iter_no_change=None,
        random_state=seed,
    ).fit(Xtr, ytr)
    row = {
        "lambda": weight,
        "seed": seed,
        "accuracy": float(clf.score(Xte, yte)),
        "bits_per_dim": float(clf.bits_per_dim(Xte)),
        "fit_seconds": time.perf_counter() - t0,
    }
    print(
        f"lambda={weight:>3} seed={seed}: accuracy {row['accuracy']:.3f}, "
        f"{row['bits_per_dim']:.3f} bits/dim ({row['fit_seconds']:.0f} s)"
    )
    return row


def summarise(runs):
    table = []
    for weight in WEIGHTS:
        sel = [r for r in runs if r["lambda"] == weight]
        entry = {"lambda": weight, "n_seeds": len(sel)}
        for key in ("accuracy", "bits_per_dim"):
            v = [r[key] for r in sel]
            entry[key] = float(np.mean(v))
            entry[f"{key}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        table.append(entry)
    return table


def plot(table, args):
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no figure")
        return
    fig, ax = plt.subplots(figsize=(5, 4))
    for e in table:
        ax.errorbar(
            e["bits_per_dim"],
            e["accuracy"],
            xerr=e["bits_per_dim_std"],
            yerr=e["accuracy_std"],
            fmt="o",
            capsize=3,
            label=f"lambda = {e['lambda']}",
        )
    ax.set_xscale("log")
    ticks = [2, 3, 5, 10, 20, 40]
    ax.set_xticks(ticks, [str(t) for t in ticks], minor=False)
    ax.set_xticks([], minor=True)
    ax.set(
        xlabel="held-out bits/dim (lower is better)",
        ylabel="held-out accuracy",
    )
    ax.legend()
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
    data = train_test_split(X, y, test_size=297, random_state=0)
    t0 = time.perf_counter()
    runs = [run(w, s, data, args) for s in args.seeds for w in WEIGHTS]
    table = summarise(runs)
    save_results(__file__, args, t0, summary=table, runs=runs)
    plot(table, args)


if __name__ == "__main__":
    main()
