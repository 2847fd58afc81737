"""Memory and step time of the four gradient modes vs series terms (paper Fig. 3).

Plots ``docs/benchmarks/logdet_memory.json``, written by
``benchmarks/bench_logdet_memory.py`` (see ``docs/benchmarks/logdet_memory.md``
for how it measures: one training step per process, peak memory of the step
above the process baseline, median step time, 1 thread). This script does not
re-run the benchmark; it only draws the figure and a table of the numbers.

Runtime (measured): about 2 seconds (plotting only). To refresh the numbers
first run ``python benchmarks/bench_logdet_memory.py`` (several minutes).

    python experiments/plot_logdet_memory.py
"""

import argparse
import json

from _common import ROOT, STATIC, pyplot, setup, write_json

MODES = ["naive", "neumann", "backward_in_forward", "memory_efficient"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=str(ROOT / "docs/benchmarks/logdet_memory.json"))
    p.add_argument("--quick", action="store_true", help="same as the default (cheap)")
    p.add_argument("--out", default=str(STATIC / "logdet_memory"))
    return p.parse_args(argv)


def table(results):
    rows = []
    for model in dict.fromkeys(r["model"] for r in results):
        for mode in MODES:
            for r in sorted(
                (r for r in results if r["model"] == model and r["mode"] == mode),
                key=lambda r: r["n"],
            ):
                rows.append(
                    {
                        "model": model,
                        "mode": mode,
                        "n": r["n"],
                        "peak_mib": r["peak_mib"],
                        "step_s": r["step_s"],
                    }
                )
    return rows


def plot(rows, out):
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no figure")
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(
        2, len(models), figsize=(5 * len(models), 7), squeeze=False
    )
    for j, model in enumerate(models):
        for mode in MODES:
            sel = [r for r in rows if r["model"] == model and r["mode"] == mode]
            if not sel:
                continue
            n = [r["n"] for r in sel]
            axes[0][j].plot(n, [r["peak_mib"] for r in sel], "o-", label=mode)
            axes[1][j].plot(n, [r["step_s"] for r in sel], "o-", label=mode)
        axes[0][j].set(title=f"{model} model", ylabel="peak step memory (MiB)")
        axes[1][j].set(xlabel="series terms n", ylabel="step time (s)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=100)
    print(f"wrote {out}.png")


def main(argv=None):
    args = parse_args(argv)
    setup()
    with open(args.input) as f:
        bench = json.load(f)
    rows = table(bench["results"])
    for r in rows:
        print(
            f"{r['model']:>8} {r['mode']:>20} n={r['n']:>3}: "
            f"{r['peak_mib']:8.1f} MiB {r['step_s'] * 1e3:8.1f} ms"
        )
    write_json(
        f"{args.out}.json",
        {
            "command": "python experiments/plot_logdet_memory.py",
            "source": "docs/benchmarks/logdet_memory.json",
            "config": bench.get("config"),
            "machine": bench.get("machine"),
            "rows": rows,
        },
    )
    plot(rows, args.out)


if __name__ == "__main__":
    main()
