#!/usr/bin/env python
"""skresflow vs normflows' residual flow (and zuko NSF/MAF for context), on CPU.

normflows and zuko are *benchmark-only* requirements (``pip install normflows
zuko``); skresflow does not depend on them.

Same architecture on both sides: ``n_blocks`` residual blocks, each with the
branch LipSwish -> Linear(d, H) -> LipSwish -> Linear(H, H) -> LipSwish ->
Linear(H, d) (normflows' ``LipschitzMLP``; ours is ``mlp_branch(...,
preactivation=True)``), spectral-norm coefficient ``c``, an ActNorm per block,
float32, Adam, the same batch. Log-det settings: unbiased estimator with 2 exact
terms, geometric(0.5) Russian roulette, one Gaussian Hutchinson probe,
Neumann gradient + backward-in-forward on both sides (normflows'
``reduce_memory=True``). Lipschitz constraint: normflows' default (5 power
iterations per layer per training forward); ours as shipped (for dense layers of
this size ``sigma`` certified within ``rtol`` of the exact norm by a batched
Cholesky factorisation once per optimizer step).

Measured, each in the same process, interleaved over ``--repeats`` rounds
(medians reported, and ratios ours / theirs):

* training: optimizer steps per second (forward, backward, Adam step);
* scoring: ``log_prob`` rows per second in evaluation mode, with the exact
  log-det (normflows: its brute-force 2-D determinant; for d > 2 it has no exact
  log-det, its closest is ``exact_trace=True``, the 20-term series with exact
  traces) and with the unbiased estimator (20 exact terms + roulette, 1 probe);
* sampling: rows per second. Both libraries are run on the *same* function
  (normflows' ``Residual`` wrapping our trained branches), so that the solvers
  face the same problem: (a) library API (``model.sample``; normflows also
  computes a log-det there, and stops at its own tolerance), (b) inversion only
  at an equal tolerance: both stop when the step ``|x_{k+1} - x_k|_inf`` (which
  equals the residual ``|x + g(x) - y|_inf``) is at most ``--tol`` (normflows'
  ``_inverse_fixed_point`` with ``atol=tol**2, rtol=0``, since it compares the
  *squared* step); the achieved error ``max |f(x) - z|`` is reported;
* peak memory of one training step: the peak of torch.profiler's CPU memory
  timeline (tensors allocated during the step);
* ``--big-score-rows`` (default 10,000): exact ``score_samples`` of that many
  64-feature rows by ``ResidualFlowDensity`` (float64, 8 blocks) fitted for one
  epoch on digits, with hidden layers (128, 128) and with the default (32, 32).

Times are CPU seconds of this process (``time.process_time``) with one torch
thread, so that other jobs on a shared machine slow the measures less.

Usage::

    python benchmarks/bench_peers.py                  # writes docs/benchmarks/
    python benchmarks/bench_peers.py --quick --no-write
    python benchmarks/bench_peers.py --train-only --no-zuko --big-score-rows 0 \\
        --no-write                                    # training only
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

import skresflow
from skresflow.core import ActNorm, Flow, ResidualBlock, initialize_actnorm, mlp_branch
from skresflow.datasets import make_toy

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "docs", "benchmarks", "performance_peers.json")


# ----------------------------------------------------------------------- data
def load_data(d):
    if d == 2:
        X = make_toy("moons", n_samples=4000, random_state=0)
    else:
        from sklearn.datasets import load_digits

        rng = np.random.default_rng(0)
        X = load_digits().data + rng.uniform(-0.5, 0.5, (1797, 64))
        X = X[:, :d]
    X = (X - X.mean(0)) / X.std(0)
    return torch.tensor(X, dtype=torch.float32)


# --------------------------------------------------------------------- models
def ours(d, cfg, estimator="unbiased"):
    layers = []
    for _ in range(cfg.n_blocks):
        g = mlp_branch(d, (cfg.hidden,) * 2, coeff=cfg.coeff, preactivation=True)
        layers += [ActNorm(d), ResidualBlock(g)]
    flow = Flow(layers + [ActNorm(d)], (d,))
    flow.configure_logdet(estimator=estimator, n_exact_terms=2, grad="memory_efficient")
    return flow


def theirs(d, cfg, brute_force=False, exact_trace=False):
    import normflows as nf

    flows = []
    for _ in range(cfg.n_blocks):
        net = nf.nets.LipschitzMLP(
            [d, cfg.hidden, cfg.hidden, d], lipschitz_const=cfg.coeff, init_zeros=True
        )
        flows += [
            nf.flows.Residual(
                net,
                reduce_memory=True,
                brute_force=brute_force,
                exact_trace=exact_trace,
            ),
            nf.flows.ActNorm(d),
        ]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), flows)


def zuko_flow(kind, d, cfg):
    import zuko

    build = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}[kind]
    return build(d, transforms=cfg.n_blocks, hidden_features=(cfg.hidden,) * 2)


def log_prob_fn(lib, model, gen=None):
    if lib == "ours":
        return lambda x: model.log_prob(x, gen)
    if lib == "normflows":
        return model.log_prob
    return lambda x: model().log_prob(x)


# ------------------------------------------------------------------- measures
def train_rate(lib, model, X, cfg, n_steps):
    gen = torch.Generator().manual_seed(0)
    log_prob = log_prob_fn(lib, model, gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    idx = torch.randint(0, X.shape[0], (n_steps + 2, cfg.batch_size), generator=gen)
    model.train()

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = -log_prob(X[idx[i]]).mean()
        loss.backward()
        opt.step()

    step(0)
    step(1)  # warm-up: first-step initialisations
    t = time.process_time()
    for i in range(2, n_steps + 2):
        step(i)
    return n_steps / (time.process_time() - t)


def score_rate(lib, model, X, n_rows):
    model.eval()
    gen = torch.Generator().manual_seed(1)
    log_prob = log_prob_fn(lib, model, gen)
    x = X[:n_rows]
    with torch.no_grad():
        log_prob(x[:8])
        t = time.process_time()
        out = log_prob(x)
    dt = time.process_time() - t
    assert torch.isfinite(out).all(), lib
    return n_rows / dt


def peak_memory_mb(lib, model, X, cfg):
    """Peak of torch.profiler's CPU memory timeline over one training step."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    log_prob = log_prob_fn(lib, model, gen)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = X[torch.randint(0, X.shape[0], (cfg.batch_size,), generator=gen)]
    model.train()
    for _ in range(2):  # optimizer state exists before the measured step
        opt.zero_grad(set_to_none=True)
        (-log_prob(x).mean()).backward()
        opt.step()
    path = f"/tmp/skresflow_memtl_{os.getpid()}.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            opt.zero_grad(set_to_none=True)
            (-log_prob(x).mean()).backward()
            opt.step()
        prof.export_memory_timeline(path, device="cpu")
    _, sizes = json.load(open(path))
    os.remove(path)
    return float(np.asarray(sizes).sum(1).max()) / 2**20


# ------------------------------------------------------------------- sampling
class _OurActNormAsNormflows(torch.nn.Module):
    """Adapter: our ActNorm as a normflows flow (forward = latent -> data)."""

    def __init__(self, actnorm):
        super().__init__()
        self.actnorm = actnorm

    def forward(self, z):
        return self.actnorm.inverse(z), z.new_zeros(z.shape[0])

    def inverse(self, x):
        return self.actnorm(x)


def normflows_twin(flow):
    """normflows model computing the same function as ``flow`` (our branches)."""
    import normflows as nf

    flows = []
    for layer in flow.layers:  # data -> latent; normflows lists latent -> data
        if isinstance(layer, ResidualBlock):
            flows.append(nf.flows.Residual(layer.g, reduce_memory=True))
        else:
            flows.append(_OurActNormAsNormflows(layer))
    d = flow.event_shape[0]
    return nf.NormalizingFlow(
        nf.distributions.DiagGaussian(d, trainable=False), flows[::-1]
    )


def invert_normflows(twin, z, tol):
    """Inversion only, normflows' own fixed-point solver, step <= tol."""
    import normflows as nf

    for f in twin.flows:
        if isinstance(f, nf.flows.Residual):
            z = f.iresblock._inverse_fixed_point(z, atol=tol**2, rtol=0.0)
        else:
            z = f(z)[0]
    return z


def sampling(flow, cfg, n_rows, rounds):
    """Rows/s of sampling on the same function; inversion at equal tolerance."""
    flow.eval()
    twin = normflows_twin(flow)
    twin.eval()
    d = flow.event_shape[0]
    z = torch.randn(n_rows, d, generator=torch.Generator().manual_seed(2))
    runs = {
        "normflows sample()": lambda: twin.sample(n_rows)[0],
        "ours Flow.sample()": lambda: _sample_ours(flow, n_rows),
        # normflows' sample() stops when every element's squared step is below
        # 1e-5 (1 + |y|); a residual (= step) of at most sqrt(1e-5) per row is
        # at least as strict.
        "ours Flow.sample() at normflows' tolerance": lambda: _sample_ours(
            flow, n_rows, atol=1e-5**0.5, rtol=0.0
        ),
        "normflows invert": lambda: invert_normflows(twin, z, cfg.tol),
    }
    for method in ("fixed_point", "anderson", "auto"):
        runs[f"ours invert {method}"] = lambda m=method: _invert_ours(
            flow, z, cfg.tol, m
        )
    times = {k: [] for k in runs}
    errors = {}
    with torch.no_grad():
        for _ in range(rounds):
            for name, run in runs.items():
                t = time.process_time()
                x = run()
                times[name].append(time.process_time() - t)
                if "invert" in name:
                    errors[name] = float((flow(x)[0] - z).abs().max())
    return {
        name: {
            "rows_per_s": n_rows / statistics.median(ts),
            **({"max_abs_error": errors[name]} if name in errors else {}),
        }
        for name, ts in times.items()
    }


def _sample_ours(flow, n_rows, **inverse_config):
    flow.configure_inverse(**inverse_config)  # no arguments: the defaults
    return flow.sample(n_rows)


def _invert_ours(flow, z, tol, method):
    flow.configure_inverse(method=method, atol=tol, rtol=0.0)
    return flow.inverse(z, check=False)


# ----------------------------------------------------------------------- main
def compare(d, cfg):
    X = load_data(d)
    torch.manual_seed(0)
    ours_u = initialize_actnorm(ours(d, cfg), X[:2048])
    torch.manual_seed(0)
    nf_u = theirs(d, cfg)
    models = {"ours": ours_u, "normflows": nf_u}
    if d <= 8:
        torch.manual_seed(0)
        models["ours (exact log-det)"] = initialize_actnorm(
            ours(d, cfg, "exact"), X[:2048]
        )
        torch.manual_seed(0)
        models["normflows (brute-force log-det)"] = theirs(d, cfg, brute_force=True)
    if not cfg.no_zuko:
        for kind in ("nsf", "maf"):
            torch.manual_seed(0)
            models[f"zuko {kind.upper()}"] = zuko_flow(kind, d, cfg)
    lib = {
        name: "ours" if name.startswith("ours") else name.split()[0] for name in models
    }
    # ActNorm data init (normflows: first batch) and a short common training so
    # that the scoring/sampling problems are not those of a fresh model.
    train = {name: [] for name in models}
    for _ in range(cfg.repeats):
        for name, model in models.items():
            train[name].append(train_rate(lib[name], model, X, cfg, cfg.train_steps))
    result = {"n_features": d, "train_steps_per_s": {}, "peak_train_mb": {}}
    for name in models:
        result["train_steps_per_s"][name] = statistics.median(train[name])
        result["peak_train_mb"][name] = peak_memory_mb(lib[name], models[name], X, cfg)
    if not cfg.train_only:
        result["score_rows_per_s"] = score_all(d, cfg, X, models, lib)
        result["sampling"] = sampling(ours_u, cfg, cfg.sample_rows, max(cfg.repeats, 5))
    return result


def score_all(d, cfg, X, models, lib):
    ours_u, nf_u = models["ours"], models["normflows"]
    scorers = {}
    ours_u.configure_logdet(estimator="exact")
    scorers["ours exact"] = ("ours", ours_u, "exact")
    scorers["ours unbiased (20 exact terms)"] = ("ours", ours_u, "unbiased")
    if d == 2:
        scorers["normflows brute-force exact"] = ("normflows", nf_u, None)
    else:
        scorers["normflows unbiased (20 exact terms)"] = ("normflows", nf_u, None)
        twin = theirs(d, cfg, exact_trace=True)
        twin.load_state_dict(nf_u.state_dict())
        scorers["normflows exact-trace series"] = ("normflows", twin, None)
    for name in models:
        if name.startswith("zuko"):
            scorers[name] = ("zuko", models[name], None)
    rates = {name: [] for name in scorers}
    n_rows = cfg.score_rows
    for _ in range(cfg.repeats):
        for name, (lib_name, model, estimator) in scorers.items():
            if estimator is not None:
                model.configure_logdet(estimator=estimator, n_exact_terms=20)
            rows = n_rows if "exact" not in name or d <= 8 else n_rows // 4
            rates[name].append(score_rate(lib_name, model, X, min(rows, X.shape[0])))
    ours_u.configure_logdet(estimator="unbiased", n_exact_terms=2)
    return {name: statistics.median(r) for name, r in rates.items()}


def ratios(result):
    t, mem = result["train_steps_per_s"], result["peak_train_mb"]
    out = {
        "train ours/normflows": t["ours"] / t["normflows"],
        "peak memory ours/normflows": mem["ours"] / mem["normflows"],
    }
    if "ours (exact log-det)" in t:
        out["train exact ours/normflows brute-force"] = (
            t["ours (exact log-det)"] / t["normflows (brute-force log-det)"]
        )
    if "sampling" not in result:  # --train-only
        return out
    s, sc = result["sampling"], result["score_rows_per_s"]
    out["sample API ours/normflows"] = (
        s["ours Flow.sample()"]["rows_per_s"] / s["normflows sample()"]["rows_per_s"]
    )
    out["sample API at normflows' tolerance ours/normflows"] = (
        s["ours Flow.sample() at normflows' tolerance"]["rows_per_s"]
        / s["normflows sample()"]["rows_per_s"]
    )
    out["invert (equal tol) ours auto/normflows"] = (
        s["ours invert auto"]["rows_per_s"] / s["normflows invert"]["rows_per_s"]
    )
    nf_unb = sc.get("normflows unbiased (20 exact terms)")
    if nf_unb:
        out["score unbiased ours/normflows"] = (
            sc["ours unbiased (20 exact terms)"] / nf_unb
        )
        out["score ours exact / normflows exact-trace"] = (
            sc["ours exact"] / sc["normflows exact-trace series"]
        )
    else:
        out["score exact ours/normflows brute-force"] = (
            sc["ours exact"] / sc["normflows brute-force exact"]
        )
    return out


def big_exact_scoring(cfg):
    """CPU seconds of exact ``score_samples`` on ``cfg.big_score_rows`` x 64 rows."""
    from sklearn.datasets import load_digits

    from skresflow import ResidualFlowDensity

    X = load_digits().data
    rng = np.random.default_rng(0)
    rows = X[rng.integers(0, X.shape[0], cfg.big_score_rows)]
    rows = rows + rng.uniform(-0.5, 0.5, rows.shape)
    out = {}
    for hidden in [(cfg.hidden, cfg.hidden), "auto"]:
        est = ResidualFlowDensity(
            n_blocks=cfg.n_blocks, hidden_dims=hidden, max_iter=1, random_state=0
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one epoch: not converged, on purpose
            est.fit(X + rng.uniform(-0.5, 0.5, X.shape))
        assert est.scoring_estimator_ == "exact"
        t = time.process_time()
        scores = est.score_samples(rows)
        seconds = time.process_time() - t
        assert np.isfinite(scores).all()
        out[f"hidden {est._hidden_dims()}"] = {"cpu_seconds": seconds}
        print("exact score_samples", rows.shape, hidden, seconds, flush=True)
    return out


def _git_commit():
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True
        ).stdout.decode()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
        ).stdout.decode()
    except OSError:
        return "unknown"
    return head.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64])
    p.add_argument("--n-blocks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--coeff", type=float, default=0.97)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--score-rows", type=int, default=2048)
    p.add_argument("--sample-rows", type=int, default=2048)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--big-score-rows", type=int, default=10_000, help="0: skip")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-zuko", action="store_true")
    p.add_argument(
        "--train-only",
        action="store_true",
        help="training steps/s and peak memory only (no scoring, sampling)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, smoke test")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=OUT)
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.n_blocks, cfg.hidden, cfg.train_steps = 2, 16, 3
        cfg.score_rows, cfg.sample_rows, cfg.repeats = 64, 64, 1
        cfg.big_score_rows = min(cfg.big_score_rows, 64)
    torch.set_num_threads(cfg.threads)
    import normflows
    import zuko

    report = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        "commit": _git_commit(),
        "load_average_1min_start": os.getloadavg()[0],
        "versions": {
            "torch": torch.__version__,
            "skresflow": skresflow.__version__
            if hasattr(skresflow, "__version__")
            else "dev",
            "normflows": normflows.__version__,
            "zuko": zuko.__version__,
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(cfg).items() if k not in ("out",)},
        "results": [],
    }
    for d in cfg.dims:
        t0 = time.perf_counter()
        result = compare(d, cfg)
        result["ratios"] = ratios(result)
        result["seconds"] = time.perf_counter() - t0
        report["results"].append(result)
        print(json.dumps(result, indent=1), flush=True)
    if cfg.big_score_rows:
        report["exact_score_samples_64d"] = big_exact_scoring(cfg)
    report["load_average_1min_end"] = os.getloadavg()[0]
    if not cfg.no_write:
        with open(cfg.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print("wrote", os.path.relpath(cfg.out))


if __name__ == "__main__":
    main()
