"""Shared helpers of the experiment scripts: a plain training loop on the core
engine (so that every epoch can be scored with the exact log-likelihood of the
live weights), toy data and output paths."""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from skresflow.core import initialize_actnorm, standardizer, tabular_flow
from skresflow.core.train import Trainer
from skresflow.datasets import make_toy

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "docs" / "_static" / "reproducing"


def toy_split(name, n_train, n_test, seed):
    """Train and held-out rows of one 2-D toy (float32 tensors). ``"digits"``:
    sklearn's 8x8 digits (64 features, dequantised once with ``U(0, 1)`` noise,
    shuffled by ``seed``; at most 1,797 rows in all)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        rng = np.random.default_rng(seed)
        X = load_digits().data
        X = rng.permutation(X + rng.uniform(size=X.shape))
        n_test = min(n_test, len(X) // 4)
        X = torch.tensor(X[: n_train + n_test], dtype=torch.float32)
        return X[: len(X) - n_test], X[len(X) - n_test :]
    X = make_toy(name, n_train + n_test, random_state=seed)
    X = torch.tensor(X, dtype=torch.float32)
    return X[:n_train], X[n_train:]


def build_flow(X, *, n_blocks, hidden, activation, seed):
    """A tabular flow (standardised input, ActNorm initialised on ``X``)."""
    torch.manual_seed(seed)
    flow = tabular_flow(
        X.shape[1],
        n_blocks=n_blocks,
        hidden_dims=hidden,
        activation=activation,
        preprocessing=standardizer(X),
    )
    return initialize_actnorm(flow, X)


def exact_log_prob(flow, X):
    """Mean exact log-likelihood (nats per row) of the live weights, float64."""
    scorer = _scorer(flow)
    scorer.configure_logdet(estimator="exact", grad="naive")
    return float(scorer.log_prob(X.double()).detach().mean())


def estimate_log_prob(flow, X, config, generator):
    """Mean of the training estimator's value on ``X`` (live weights, float64)."""
    scorer = _scorer(flow)
    scorer.configure_logdet(**{**config, "grad": "naive"})
    return float(scorer.log_prob(X.double(), generator).detach().mean())


def _scorer(flow):
    import copy

    scorer = copy.deepcopy(flow).double().eval()
    scorer.refresh_lipschitz()
    return scorer


def train(flow, X, config, *, epochs, batch_size, lr, seed, on_epoch=None):
    """Maximum likelihood with the estimator ``config``; returns per-epoch
    records ``{"epoch", "objective", "seconds", **on_epoch(flow)}``. The
    objective is the mean over the epoch's steps of the estimator's own value
    (what a user of that estimator would see as the training log-likelihood)."""
    flow.configure_logdet(**config)
    generator = torch.Generator().manual_seed(seed)
    steps = -(-X.shape[0] // batch_size)
    trainer = Trainer(
        flow, lr=lr, total_steps=epochs * steps, warmup_steps=min(100, steps)
    )
    history = []
    for epoch in range(1, epochs + 1):
        t0, total = time.perf_counter(), []
        flow.train()
        for idx in torch.randperm(X.shape[0], generator=generator).split(batch_size):
            xb = X[idx]
            total.append(
                trainer.step(lambda xb=xb: -flow.log_prob(xb, generator).mean())
            )
        record = {
            "epoch": epoch,
            "objective": -float(np.nanmean(total)),
            "seconds": time.perf_counter() - t0,
        }
        if on_epoch is not None:
            record.update(on_epoch(flow))
        history.append(record)
    return history


def write_json(path, payload):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def save_results(script, args, t0, **payload):
    """``{args.out}.json`` with the command, arguments and seconds of a run."""
    write_json(
        f"{args.out}.json",
        {
            "command": f"python experiments/{Path(script).name}",
            "args": vars(args),
            "seconds": time.perf_counter() - t0,
            **payload,
        },
    )


def digits_args(description, out_name, argv=None):
    """Command line of the digits experiments: seeds, budget, model size."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-iter", type=int, default=40)
    p.add_argument("--n-blocks", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test settings")
    p.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    p.add_argument("--out", default=str(STATIC / out_name))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.max_iter, args.n_blocks, args.hidden = [0], 1, 1, 16
    return args


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def setup(seed=0):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    np.random.seed(seed)
