#!/usr/bin/env python
"""Peak memory and time of one training step for the four log-det gradient modes.

For a tabular and an MNIST-shaped image flow, every combination of
``grad`` in (naive, neumann, backward_in_forward, memory_efficient) and
``n`` series terms in (2, 5, 10, 20) is measured in fresh Python processes: one
for memory, one for time. The residual blocks use ``estimator="truncated",
n_exact_terms=n``, so every block evaluates exactly ``n`` power-series terms
(no random series length). Results go to ``docs/benchmarks/logdet_memory.md``
(the block between its GENERATED markers) and ``logdet_memory.json``.

One training step is ``opt.zero_grad(); loss = -flow.log_prob(x).mean();
loss.backward(); opt.step()`` with Adam, after one warm-up step.

Memory process (two measures, see the doc for the reasoning):

``rss``
    The step's resident-set high-water mark above the resident set at the start
    of the step. The kernel's high-water mark (``VmHWM``) is reset right before
    the step by writing ``5`` to ``/proc/self/clear_refs``, so earlier steps
    cannot hide the step's peak. The process is started with
    ``MALLOC_MMAP_THRESHOLD_`` fixed (64 KiB), so glibc serves every tensor
    buffer of 64 KiB or more with its own ``mmap`` and returns it to the
    kernel on ``free``: RSS then follows the live tensor bytes instead of
    glibc's heap high-water mark.
``saved``
    Peak bytes of tensors held by autograd for backward, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage,
    parameters/buffers/the batch excluded, freed when autograd drops them). It
    includes graphs built *during* backward (the deferred log-det gradient of
    ``backward_in_forward`` / ``memory_efficient``). It does not count
    transient buffers that are never saved (gradient buffers, temporaries).

Time process: CPU time (``time.process_time``) and wall time of ``--repeats``
steps, median, *without* the mmap threshold (which makes every allocation
fault in fresh pages and slowed steps 3-4x). Then a paired run per model
alternates the four modes step by step in one process, and a diagnostic run
breaks memory_efficient's peak down by block and by autograd node.

The workers import a copy of ``skresflow/`` frozen at the start of the run
(``--live`` to import the working tree), since the package is installed
editable and may be edited while the benchmark runs.

Usage::

    python benchmarks/bench_logdet_memory.py                  # full run, writes docs/
    python benchmarks/bench_logdet_memory.py --models tabular --ns 2 10 --no-write
    python benchmarks/bench_logdet_memory.py --models image --ns 10 --depth 2 \\
        --no-floor --no-diagnose --paired-ns --no-write      # deeper model
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/bench_logdet_memory.py \\
        --worker --model image --mode naive --n 10           # one memory worker
"""

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

MODES = ("naive", "neumann", "backward_in_forward", "memory_efficient")
# The reference implementation's naive path: backprop through the series with
# every term an autograd vector-Jacobian product (double backward), i.e. `naive`
# with the branches hidden from skresflow's closed forms (which MLP and conv
# branches otherwise get in every mode). The reference's ratios were measured
# against this path, so the goals are checked against it as well as against ours.
AUTOGRAD = "naive_autograd"
ALL_MODES = (*MODES, AUTOGRAD)
# Diagnostic floor: the same architecture and step with every residual block's
# log-det replaced by 0, i.e. only the path-wise graph of x + g(x). No gradient
# mode can need less; it is run once per model (n does not matter).
FLOOR = "no_logdet"
NS = (2, 5, 10, 20)
MODELS = ("tabular", "image")
MMAP_THRESHOLD = 64 * 1024
MIB = 1024**2
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "docs" / "benchmarks" / "logdet_memory.json"
DEFAULT_MD = ROOT / "docs" / "benchmarks" / "logdet_memory.md"

# Reference ratios (original implementation, small MNIST-shaped model, n = 10,
# 2-core machine), as quoted in the issue.
REFERENCE = {
    "memory_efficient_mem_pct": 12.5,
    "neumann_mem_pct": 16.6,
    "backward_in_forward_mem_pct": 44.0,
    "neumann_speedup": 2.5,
    "flat_tolerance_pct": 10.0,
}

# Model sizes. Chosen so that one step takes well under a few seconds on one
# CPU thread while the activations are large enough (tens of MiB) for RSS to
# resolve them.
CONFIG = {
    "tabular": {"batch": 1024, "features": 64, "hidden": (128, 128), "blocks": 4},
    "image": {
        "batch": 32,
        "shape": (1, 28, 28),
        "hidden_channels": 32,
        "blocks_per_scale": 2,
        "scales": 3,
    },
}


# ============================================================================ worker
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _rss_bytes():
    return _status_kib("VmRSS") * 1024


def _hwm_bytes():
    return _status_kib("VmHWM") * 1024


def _reset_hwm():
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Packed:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedTensorTracker:
    """Live and peak bytes of tensors that autograd saves for backward.

    Storages are counted once however many graph nodes save them; storages in
    ``exclude`` (parameters, buffers, the batch) are not counted at all.
    """

    def __init__(self, exclude=()):
        self.exclude = set(exclude)
        self.live = {}
        self.current = self.peak = 0
        self.phase = "forward"
        self.peak_by_phase = {}

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def pack(self, tensor):
        try:
            storage = tensor.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return tensor
        if ptr in self.exclude or nbytes == 0:
            return tensor
        if ptr in self.live:
            self.live[ptr][1] += 1
        else:
            self.live[ptr] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self.peak_by_phase[self.phase] = max(
                self.peak_by_phase.get(self.phase, 0), self.current
            )
        packed = _Packed(tensor)
        weakref.finalize(packed, self._release, ptr)
        return packed

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, _Packed) else packed


def build(model, n, mode, torch, activation="lipswish"):
    """Return ``(flow, x)`` for one configuration (fixed seeds)."""
    from skresflow.core import (
        ActNorm,
        Flow,
        LogitTransform,
        ResidualBlock,
        Squeeze,
        conv_branch,
        mlp_branch,
    )

    cfg = CONFIG[model]
    torch.manual_seed(0)
    kw = {
        "estimator": "truncated",
        "n_exact_terms": n,
        "grad": {FLOOR: "memory_efficient", AUTOGRAD: "naive"}.get(mode, mode),
    }
    if model == "tabular":
        d = cfg["features"]
        layers = [ActNorm(d)]
        for _ in range(cfg["blocks"]):
            layers += [
                ResidualBlock(
                    mlp_branch(d, cfg["hidden"], activation=activation), **kw
                ),
                ActNorm(d),
            ]
        flow = Flow(layers, (d,))
        mix = torch.randn(d, d) / d**0.5
        z = torch.randn(cfg["batch"], d)
        x = z @ mix + 0.5 * torch.sin(2 * z)
    else:
        c, h, w = cfg["shape"]
        hidden = cfg["hidden_channels"]
        layers = [LogitTransform(1e-6)]
        for scale in range(cfg["scales"]):
            if scale:
                layers.append(Squeeze())
                c, h, w = 4 * c, h // 2, w // 2
            for _ in range(cfg["blocks_per_scale"]):
                layers += [
                    ActNorm(c),
                    ResidualBlock(conv_branch(c, hidden, activation=activation), **kw),
                ]
        layers.append(ActNorm(c))
        flow = Flow(layers, cfg["shape"])
        # MNIST-shaped, uniformly dequantised 8-bit values in [0, 1].
        x = (
            torch.randint(0, 256, (cfg["batch"], *cfg["shape"])).float()
            + torch.rand(cfg["batch"], *cfg["shape"])
        ) / 256
    if mode == AUTOGRAD:
        for block in flow.blocks:
            block.g = _Opaque(block.g)
    if mode == FLOOR:
        for block in flow.blocks:
            block.forward = (
                lambda b: (
                    lambda x, generator=None: (x + b.g(x), x.new_zeros(x.shape[0]))
                )
            )(block)
    return flow, x


@functools.cache
def _opaque_class():
    import torch

    class Opaque(torch.nn.Module):
        """The same branch, hidden from the closed forms (autograd path)."""

        def __init__(self, g):
            super().__init__()
            self.g = g

        def forward(self, x):
            return self.g(x)

    return Opaque


def _Opaque(g):
    return _opaque_class()(g)


def core_source_hash():
    """sha256 of skresflow/core/*.py as imported (the package is edited live)."""
    import hashlib

    import skresflow.core

    digest = hashlib.sha256()
    for path in sorted(Path(skresflow.core.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _apply_depth(depth):
    CONFIG["tabular"]["blocks"] = 4 * depth
    CONFIG["image"]["blocks_per_scale"] = 2 * depth


def paired_timing_worker(args):
    """Time all modes alternately in one process (paired, drift-robust); the
    autograd naive path runs on a twin flow with the same weights."""
    import torch

    torch.set_num_threads(args.threads)
    flow, x = build(args.model, args.n, "naive", torch, args.activation)
    twin, _ = build(args.model, args.n, AUTOGRAD, torch, args.activation)
    flows = {m: flow for m in MODES} | {AUTOGRAD: twin}
    opts = {
        id(f): torch.optim.Adam(f.parameters(), lr=1e-3, betas=(0.9, 0.99))
        for f in (flow, twin)
    }
    gen = torch.Generator().manual_seed(1234)

    def step(mode):
        f = flows[mode]
        if mode in MODES:
            f.configure_logdet(grad=mode)
        opt = opts[id(f)]
        opt.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        (-f.log_prob(x, gen).mean()).backward()
        opt.step()
        return time.perf_counter() - t0, time.process_time() - c0

    for mode in ALL_MODES:  # warm-up, once per mode
        step(mode)
    wall = {m: [] for m in ALL_MODES}
    cpu = {m: [] for m in ALL_MODES}
    k = len(ALL_MODES)
    for r in range(args.rounds):
        for mode in ALL_MODES[r % k :] + ALL_MODES[: r % k]:
            w, c = step(mode)
            wall[mode].append(w)
            cpu[mode].append(c)
    result = {
        "core_sha": core_source_hash(),
        "model": args.model,
        "n": args.n,
        "threads": args.threads,
        "rounds": args.rounds,
        "wall": wall,
        "cpu": cpu,
        "speedup_cpu": {
            m: statistics.median(
                a / b for a, b in zip(cpu["naive"], cpu[m], strict=True)
            )
            for m in ALL_MODES
        },
        "speedup_wall": {
            m: statistics.median(
                a / b for a, b in zip(wall["naive"], wall[m], strict=True)
            )
            for m in ALL_MODES
        },
    }
    print("RESULT " + json.dumps(result))


def _setup(args):
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    flow, x = build(args.model, args.n, args.mode, torch, args.activation)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1234)

    def forward():
        return -flow.log_prob(x, gen).mean()

    def backward_and_update(loss):
        loss.backward()
        opt.step()

    # Warm-up step: ActNorm data-dependent init, first power iterations, Adam
    # state, autograd/allocator lazy init. Its loss and gradient norm are a
    # cross-mode sanity check (same parameters, same draws in every mode).
    opt.zero_grad(set_to_none=True)
    loss = forward()
    loss.backward()
    grads = [p.grad.flatten() for p in flow.parameters() if p.grad is not None]
    info = {
        "core_sha": core_source_hash(),
        "model": args.model,
        "mode": args.mode,
        "n": args.n,
        "threads": args.threads,
        "activation": args.activation,
        "batch": CONFIG[args.model]["batch"],
        "n_blocks": len(flow.blocks),
        "n_params": sum(p.numel() for p in flow.parameters()),
        "warmup_loss": loss.item(),
        "warmup_grad_norm": torch.cat(grads).norm().item(),
    }
    opt.step()
    del loss, grads
    gc.collect()
    return torch, flow, x, opt, forward, backward_and_update, info


def memory_worker(args):
    """Peak RSS of one step above its start, and peak saved-for-backward bytes."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        print(
            "warning: MALLOC_MMAP_THRESHOLD_ not set; RSS follows glibc's heap, "
            "not live tensors",
            file=sys.stderr,
        )
    torch, flow, x, opt, forward, backward_and_update, info = _setup(args)

    # --- RSS high-water of one step above the RSS at its start.
    opt.zero_grad(set_to_none=True)
    gc.collect()
    _reset_hwm()
    base = _rss_bytes()
    loss = forward()
    held_after_forward = _rss_bytes() - base
    peak_forward = _hwm_bytes() - base
    _reset_hwm()
    backward_and_update(loss)
    peak_backward = _hwm_bytes() - base
    del loss
    gc.collect()
    after = _rss_bytes() - base

    # --- saved-for-backward bytes, in a second step.
    exclude = {
        t.untyped_storage().data_ptr() for t in [*flow.parameters(), *flow.buffers(), x]
    }
    tracker = SavedTensorTracker(exclude)
    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
        loss = forward()
        saved_after_forward = tracker.current
        tracker.phase = "backward"
        backward_and_update(loss)
    del loss
    gc.collect()

    result = {
        **info,
        "baseline_rss_mib": base / MIB,
        "peak_mib": max(peak_forward, peak_backward) / MIB,
        "peak_forward_mib": peak_forward / MIB,
        "peak_backward_mib": peak_backward / MIB,
        "held_after_forward_mib": held_after_forward / MIB,
        "rss_after_step_mib": after / MIB,
        "saved_peak_mib": tracker.peak / MIB,
        "saved_after_forward_mib": saved_after_forward / MIB,
        "saved_peak_backward_mib": tracker.peak_by_phase.get("backward", 0) / MIB,
        "saved_leak_mib": tracker.current / MIB,
    }
    print("RESULT " + json.dumps(result))


def time_worker(args):
    """CPU and wall time of ``repeats`` steps after the warm-up step.

    Run *without* the fixed mmap threshold: with it, every tensor buffer is a
    fresh ``mmap`` whose pages fault in zeroed, which made steps 3-4x slower.
    """
    torch, flow, x, opt, forward, backward_and_update, info = _setup(args)
    wall, cpu, fwd_cpu = [], [], []
    for _ in range(args.repeats):
        opt.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = forward()
        fwd_cpu.append(time.process_time() - c0)
        backward_and_update(loss)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del loss
    result = {
        **info,
        "step_s": statistics.median(wall),
        "step_s_all": wall,
        "step_cpu_s": statistics.median(cpu),
        "step_cpu_s_all": cpu,
        "forward_cpu_s": statistics.median(fwd_cpu),
    }
    print("RESULT " + json.dumps(result))


def worker(args):
    if args.paired:
        paired_timing_worker(args)
    elif args.diagnose:
        diagnose_worker(args)
    elif args.measure == "time":
        time_worker(args)
    else:
        memory_worker(args)


# ========================================================================= diagnose
def _saved_by_node(root, seen, exclude, torch):
    """Bytes of saved tensors reachable from ``root``, by autograd node type."""
    import collections

    by, nodes, stack = collections.Counter(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                val = getattr(node, name)
            except Exception:  # freed or not a tensor attribute
                continue
            for t in val if isinstance(val, tuple | list) else (val,):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in seen or ptr in exclude or storage.nbytes() == 0:
                    continue
                seen.add(ptr)
                by[type(node).__name__] += storage.nbytes()
        stack.extend(f for f, _ in node.next_functions)
    return by


def _cost_pieces(flow, block_input, torch):
    """CPU ms of the pieces of the series for one residual block (median of 9)."""

    def cpu(f, repeats=9):
        f()
        ts = []
        for _ in range(repeats):
            c0 = time.process_time()
            f()
            ts.append(time.process_time() - c0)
        return statistics.median(ts)

    flow.train()
    g, xr = flow.blocks[0].g, block_input.clone().requires_grad_()
    params = list(g.parameters())
    with torch.enable_grad():
        gx = g(xr)
        v = torch.randn_like(xr)

        def path_backward():
            torch.autograd.grad(
                gx, [xr, *params], v, retain_graph=True, allow_unused=True
            )

        def vjp_graph_and_backward():
            u = torch.autograd.grad(gx, xr, v, retain_graph=True, create_graph=True)[0]
            torch.autograd.grad(
                (u * v).sum(), [xr, *params], retain_graph=True, allow_unused=True
            )

        return {
            "forward_g": 1e3 * cpu(lambda: g(xr)),
            "vjp_no_graph": 1e3
            * cpu(lambda: torch.autograd.grad(gx, xr, v, retain_graph=True)),
            "vjp_with_graph": 1e3
            * cpu(
                lambda: torch.autograd.grad(
                    gx, xr, v, retain_graph=True, create_graph=True
                )
            ),
            "vjp_with_graph_plus_its_backward": 1e3 * cpu(vjp_graph_and_backward),
            "path_wise_backward": 1e3 * cpu(path_backward),
        }


def diagnose_worker(args):
    """Where memory_efficient's peak and Neumann's time go (one model, one n)."""
    import torch

    from skresflow.core import logdet as core_logdet

    torch.set_num_threads(args.threads)
    out = {"core_sha": core_source_hash(), "model": args.model, "n": args.n}

    # 1. RSS at entry of / peak inside every deferred log-det gradient node.
    flow, x = build(args.model, args.n, "memory_efficient", torch, args.activation)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1234)
    # The memory part needs the fixed mmap threshold, the cost part must not
    # have it (see time_worker); the driver runs this worker once for each.
    steps = 2 if args.measure == "memory" else 1
    original = core_logdet._DeferredLogdet.backward
    trace, state = [], {}

    def traced(ctx, upstream):
        before = _rss_bytes()
        _reset_hwm()
        grads = original(ctx, upstream)
        trace.append(
            ((before - state["base"]) / MIB, (_hwm_bytes() - state["base"]) / MIB)
        )
        return grads

    core_logdet._DeferredLogdet.backward = staticmethod(traced)
    try:
        for _ in range(steps):  # warm-up step, then the traced one
            trace.clear()
            opt.zero_grad(set_to_none=True)
            gc.collect()
            state["base"] = _rss_bytes()
            loss = -flow.log_prob(x, gen).mean()
            held = (_rss_bytes() - state["base"]) / MIB
            loss.backward()
            opt.step()
            del loss
    finally:
        core_logdet._DeferredLogdet.backward = original
    if args.measure == "memory":
        out["held_after_forward_mib"] = held
        out["deferred_nodes"] = [
            {"block": len(trace) - 1 - i, "rss_at_entry_mib": a, "peak_inside_mib": b}
            for i, (a, b) in enumerate(trace)
        ]

    # 2. Saved tensors of every residual block: g(x) graph and one create_graph vjp.
    flow.eval()  # fixed sigma: the normalisation graph is not part of the question
    h, blocks = x, []
    with torch.no_grad():
        inputs = []
        for layer in flow.layers:
            if layer in flow.blocks:
                inputs.append(h.clone())
            h = layer(h)[0]
    for i, (block, hin) in enumerate(zip(flow.blocks, inputs, strict=True)):
        exclude = {
            t.untyped_storage().data_ptr()
            for t in [*block.g.parameters(), *block.g.buffers()]
        }
        xr = hin.clone().requires_grad_()
        exclude.add(xr.untyped_storage().data_ptr())
        with torch.enable_grad():
            gx = block.g(xr)
            seen = set()
            path = _saved_by_node(gx.grad_fn, seen, exclude, torch)
            v = torch.randn_like(xr)
            u = torch.autograd.grad(gx, xr, v, create_graph=True)[0]
            term = _saved_by_node((u * v).sum().grad_fn, seen, exclude, torch)
        blocks.append(
            {
                "block": i,
                "input_shape": list(hin.shape),
                "path_wise_mib": sum(path.values()) / MIB,
                "path_wise_by_node_mib": {k: b / MIB for k, b in path.most_common()},
                "one_vjp_term_mib": sum(term.values()) / MIB,
                "one_vjp_term_by_node_mib": {k: b / MIB for k, b in term.most_common()},
            }
        )
    out["blocks"] = blocks

    # 3. CPU cost of the pieces of the series for the first block.
    if args.measure == "time":
        out["cost_first_block_ms"] = _cost_pieces(flow, inputs[0], torch)
    print("RESULT " + json.dumps(out))


# ============================================================================ driver
SNAPSHOT = []  # directory holding a frozen copy of skresflow/ for the workers


def snapshot_package():
    """Copy skresflow/ (as it is now, committed or not) to a temporary directory.

    The package is installed editable and may be edited while the benchmark runs;
    the workers import this frozen copy instead, so every row measures the same
    code.
    """
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="bench_logdet_memory_")
    shutil.copytree(
        ROOT / "skresflow",
        Path(tmp) / "skresflow",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    SNAPSHOT[:] = [tmp]
    return tmp


def run_config(
    model,
    mode,
    n,
    threads,
    repeats,
    activation="lipswish",
    depth=1,
    rounds=None,
    diagnose=False,
    measure="memory",
):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if SNAPSHOT:
        env["PYTHONPATH"] = os.pathsep.join(
            [SNAPSHOT[0], *filter(None, [os.environ.get("PYTHONPATH")])]
        )
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "--model",
        model,
        "--mode",
        mode,
        "--n",
        str(n),
        "--threads",
        str(threads),
        "--repeats",
        str(repeats),
        "--activation",
        activation,
        "--depth",
        str(depth),
        "--measure",
        measure,
    ]
    if rounds:
        cmd += ["--paired", "--rounds", str(rounds)]
    if diagnose:
        cmd += ["--diagnose"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(
            f"worker {model}/{mode}/n={n} failed (rc {proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    result["process_wall_s"] = wall
    return result


def git_state():
    """HEAD commit and whether skresflow/ has uncommitted changes."""

    def git(*cmd):
        try:
            return subprocess.run(
                ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "skresflow_dirty": bool(git("status", "--porcelain", "--", "skresflow")),
    }


def machine_info():
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": load,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _by(results):
    return {(r["model"], r["mode"], r["n"]): r for r in results}


def evaluate_goals(results, model, paired=()):
    """The issue's goals, checked at n = 10 (and flatness n = 2 vs 20), against
    our naive path and against the reference's autograd naive path."""
    r = _by(results)
    goals = []

    def have(*keys):
        return all((model, m, n) in r for m, n in keys)

    for base in ("naive", AUTOGRAD):
        label = "naive" if base == "naive" else "autograd naive"
        for mode, key in (
            ("memory_efficient", "memory_efficient_mem_pct"),
            ("neumann", "neumann_mem_pct"),
            ("backward_in_forward", "backward_in_forward_mem_pct"),
        ):
            if have((base, 10), (mode, 10)):
                v = (
                    100
                    * r[(model, mode, 10)]["peak_mib"]
                    / r[(model, base, 10)]["peak_mib"]
                )
                goals.append(
                    (
                        f"{mode} peak <= {REFERENCE[key]:g} % of {label} (n = 10)",
                        f"{v:.1f} %",
                        v <= REFERENCE[key],
                    )
                )
        if have((base, 10), ("neumann", 10)):
            a, b = r[(model, base, 10)], r[(model, "neumann", 10)]
            v, w = a["step_cpu_s"] / b["step_cpu_s"], a["step_s"] / b["step_s"]
            goals.append(
                (
                    f"neumann step >= 2.5x faster than {label} (n = 10), CPU time, "
                    "separate processes",
                    f"{v:.2f}x (wall {w:.2f}x)",
                    v >= REFERENCE["neumann_speedup"],
                )
            )
        for pr in paired:
            if pr["model"] == model and pr["n"] == 10 and base in pr["cpu"]:
                v = statistics.median(
                    a / b
                    for a, b in zip(pr["cpu"][base], pr["cpu"]["neumann"], strict=True)
                )
                w = statistics.median(
                    a / b
                    for a, b in zip(
                        pr["wall"][base], pr["wall"]["neumann"], strict=True
                    )
                )
                goals.append(
                    (
                        f"neumann step >= 2.5x faster than {label} (n = 10), CPU "
                        "time, paired in one process",
                        f"{v:.2f}x (wall {w:.2f}x)",
                        v >= REFERENCE["neumann_speedup"],
                    )
                )
    if have(("memory_efficient", 2), ("memory_efficient", 20)):
        a = r[(model, "memory_efficient", 2)]["peak_mib"]
        b = r[(model, "memory_efficient", 20)]["peak_mib"]
        v = 100 * (b - a) / a
        goals.append(
            (
                "memory_efficient flat in n: peak(n = 20) within 10 % of peak(n = 2)",
                f"{v:+.1f} %",
                abs(v) <= REFERENCE["flat_tolerance_pct"],
            )
        )
    return goals


def model_description(model):
    cfg = CONFIG[model]
    if model == "tabular":
        return (
            f"x: ({cfg['batch']}, {cfg['features']}); ActNorm, then "
            f"{cfg['blocks']} x [ResidualBlock(mlp_branch({cfg['features']}, "
            f"{cfg['hidden']})), ActNorm]"
        )
    c, h, w = cfg["shape"]
    return (
        f"x: ({cfg['batch']}, {c}, {h}, {w}) dequantised uniform 8-bit; "
        f"LogitTransform(1e-6), {cfg['scales']} scales of {cfg['blocks_per_scale']} x "
        f"[ActNorm, ResidualBlock(conv_branch(C, {cfg['hidden_channels']}))] with a "
        "Squeeze between scales (C = 1, 4, 16), final ActNorm"
    )


def markdown_tables(results, models, paired=()):
    r = _by(results)
    out = []
    for model in models:
        rows = [x for x in results if x["model"] == model]
        if not rows:
            continue
        any_row = rows[0]
        out.append(f"### {model}\n")
        out.append(
            f"{model_description(model)}; activation {any_row['activation']}; "
            f"{any_row['n_blocks']} residual blocks, "
            f"{any_row['n_params']:,} parameters, {any_row['threads']} torch "
            "thread(s).\n"
        )
        out.append(
            "| mode | n | peak MiB (RSS) | % of naive | saved-for-backward "
            "peak MiB | % of naive | step CPU s | speed vs naive (CPU) "
            "| step wall s | speed vs naive (wall) |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        ns = sorted({x["n"] for x in rows})
        for n in ns:
            naive = r.get((model, "naive", n))
            for mode in ALL_MODES:
                x = r.get((model, mode, n))
                if x is None:
                    continue
                pct = (
                    f"{100 * x['peak_mib'] / naive['peak_mib']:.1f} %" if naive else "-"
                )
                spct = (
                    f"{100 * x['saved_peak_mib'] / naive['saved_peak_mib']:.1f} %"
                    if naive
                    else "-"
                )
                cspeed = (
                    f"{naive['step_cpu_s'] / x['step_cpu_s']:.2f}x" if naive else "-"
                )
                speed = f"{naive['step_s'] / x['step_s']:.2f}x" if naive else "-"
                out.append(
                    f"| {mode} | {n} | {x['peak_mib']:.1f} | {pct} | "
                    f"{x['saved_peak_mib']:.1f} | {spct} | "
                    f"{x['step_cpu_s']:.3f} | {cspeed} | {x['step_s']:.3f} | "
                    f"{speed} |"
                )
        floor = [x for x in rows if x["mode"] == FLOOR]
        for x in floor:
            out.append(
                f"| *{FLOOR} (floor)* | - | {x['peak_mib']:.1f} | | "
                f"{x['saved_peak_mib']:.1f} | | {x['step_cpu_s']:.3f} | | "
                f"{x['step_s']:.3f} | |"
            )
        out.append("")
        out.append(
            f"Phases of the measured step ({model}), MiB above the step's start: "
            "RSS held when the forward returns, RSS peak during the forward, RSS "
            "peak during backward + Adam step; saved-for-backward bytes when the "
            "forward returns and their peak during backward (graphs built inside "
            "backward); CPU seconds of the forward and of backward + Adam step "
            "(medians, timing process).\n"
        )
        out.append(
            "| mode | n | held after fwd | fwd peak | bwd peak | saved after fwd "
            "| saved peak in bwd | fwd CPU s | bwd + step CPU s |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        order = (*ALL_MODES, FLOOR)
        for x in sorted(rows, key=lambda x: (order.index(x["mode"]), x["n"])):
            out.append(
                f"| {x['mode']} | {x['n'] if x['mode'] != FLOOR else '-'} | "
                f"{x['held_after_forward_mib']:.1f} | {x['peak_forward_mib']:.1f} | "
                f"{x['peak_backward_mib']:.1f} | {x['saved_after_forward_mib']:.1f} | "
                f"{x['saved_peak_backward_mib']:.1f} | {x['forward_cpu_s']:.3f} | "
                f"{x['step_cpu_s'] - x['forward_cpu_s']:.3f} |"
            )
        out.append("")
        prs = [pr for pr in paired if pr["model"] == model]
        if prs:
            out.append(
                f"Paired timing ({model}): the modes alternated step by step in "
                "one process (rotating order), so that load drift hits all modes "
                "alike; median step time and median of the per-round ratios "
                "naive / mode.\n"
            )
            out.append(
                "| n | mode | rounds | step CPU s | speed vs naive (CPU) | "
                "step wall s | speed vs naive (wall) |"
            )
            out.append("|---:|---|---:|---:|---:|---:|---:|")
            for pr in prs:
                for m in ALL_MODES:
                    out.append(
                        f"| {pr['n']} | {m} | {pr['rounds']} | "
                        f"{statistics.median(pr['cpu'][m]):.3f} | "
                        f"{pr['speedup_cpu'][m]:.2f}x | "
                        f"{statistics.median(pr['wall'][m]):.3f} | "
                        f"{pr['speedup_wall'][m]:.2f}x |"
                    )
            out.append("")
        goals = evaluate_goals(results, model, prs)
        if goals:
            out.append(f"Goals ({model}):\n")
            out.append("| goal | measured | met |")
            out.append("|---|---:|---|")
            for name, value, ok in goals:
                out.append(f"| {name} | {value} | {'yes' if ok else '**no**'} |")
            out.append("")
    return "\n".join(out)


def code_line(payload):
    gs, ge, shas = payload["git_start"], payload["git_end"], payload["core_sha"]
    if payload.get("frozen_copy"):
        line = (
            f"Code: skresflow/ as it was at the start of the run (commit "
            f"{gs['head']}, {'with' if gs['skresflow_dirty'] else 'without'} "
            "uncommitted changes to skresflow/), copied to a temporary directory "
            "that every worker imported; sha256 of its core/*.py: "
            f"{', '.join(shas)}."
        )
    else:
        line = (
            f"Code: the live working tree; skresflow at commit {gs['head']} "
            f"({'with' if gs['skresflow_dirty'] else 'without'} uncommitted changes "
            f"to skresflow/) when the run started, {ge['head']} "
            f"({'with' if ge['skresflow_dirty'] else 'without'}) when it ended; "
            f"hash of skresflow/core/*.py seen by the workers: {', '.join(shas)}."
        )
    if len(shas) > 1:
        line += (
            " **Warning: the core changed during the run; rows may come from "
            "different code.**"
        )
    return line


def markdown_diagnostics(diagnostics):
    out = []
    for d in diagnostics:
        model = d["model"]
        out.append(f"### Diagnostics: {model}, memory_efficient, n = {d['n']}\n")
        out.append(
            "RSS (MiB above the step's start) on entry to each block's deferred "
            "log-det gradient node during backward, and the peak while it runs "
            f"(held after forward: {d['held_after_forward_mib']:.1f} MiB):\n"
        )
        out.append("| block | RSS at entry | peak inside | transient |")
        out.append("|---:|---:|---:|---:|")
        for node in d["deferred_nodes"]:
            out.append(
                f"| {node['block']} | {node['rss_at_entry_mib']:.1f} | "
                f"{node['peak_inside_mib']:.1f} | "
                f"{node['peak_inside_mib'] - node['rss_at_entry_mib']:.1f} |"
            )
        out.append("")
        out.append(
            "Saved tensors per residual block (MiB, by autograd node type; weights "
            "and the block input excluded): the path-wise graph of g(x), and what "
            "one differentiable vector-Jacobian product adds (naive keeps n of "
            "these per block, neumann one, memory_efficient one block's at a time, "
            "inside backward).\n"
        )
        out.append("| block | input | path-wise g(x) | one vjp term | largest nodes |")
        out.append("|---:|---|---:|---:|---|")
        for b in d["blocks"]:
            top = ", ".join(
                f"{k} {v:.1f}"
                for k, v in list(b["one_vjp_term_by_node_mib"].items())[:3]
            )
            ptop = ", ".join(
                f"{k} {v:.1f}" for k, v in list(b["path_wise_by_node_mib"].items())[:2]
            )
            out.append(
                f"| {b['block']} | {tuple(b['input_shape'])} | "
                f"{b['path_wise_mib']:.1f} | {b['one_vjp_term_mib']:.1f} | "
                f"g(x): {ptop}; vjp: {top} |"
            )
        out.append("")
        c = d["cost_first_block_ms"]
        out.append(
            "CPU cost of the pieces for block 0 (ms, median of 9; no mmap threshold): "
            "forward g(x) "
            f"{c['forward_g']:.1f}; vjp without graph {c['vjp_no_graph']:.1f}; vjp "
            f"with graph {c['vjp_with_graph']:.1f}; vjp with graph + its backward "
            f"(w.r.t. x and weights) {c['vjp_with_graph_plus_its_backward']:.1f}; "
            f"backward of g(x) alone {c['path_wise_backward']:.1f}.\n"
        )
    return "\n".join(out)


def write_markdown(path, payload):
    """Replace the generated block between the markers, keeping hand-written text."""
    begin, end = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"
    m = payload["machine"]
    block = "\n".join(
        [
            begin,
            "",
            f"Generated by `{payload['command']}` on {m['date']}.",
            "",
            f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']}, "
            f"Python {m['python']}, {m['platform']}; load average at start "
            f"{', '.join(f'{v:.2f}' for v in m['loadavg_at_start'] or [])}; "
            f"total wall time {payload['total_wall_s']:.0f} s.",
            "",
            code_line(payload),
            "",
            markdown_tables(
                payload["results"], payload["models"], payload["paired_timing"]
            ),
            markdown_diagnostics(payload["diagnostics"]),
            end,
        ]
    )
    path = Path(path)
    text = (
        path.read_text()
        if path.exists()
        else f"# Log-det gradient modes: memory\n\n{begin}\n{end}\n"
    )
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--modes", nargs="+", default=list(ALL_MODES), choices=ALL_MODES
    )
    parser.add_argument("--ns", nargs="+", type=int, default=list(NS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per worker (default 1)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed training steps per configuration (median reported)",
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help=f"skip the diagnostic '{FLOOR}' run per model",
    )
    parser.add_argument(
        "--activation",
        default="lipswish",
        help="activation of the residual branches (default lipswish)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=1,
        help="multiply the number of residual blocks (tabular 4 x depth, image "
        "2 x depth per scale); default 1",
    )
    parser.add_argument(
        "--paired-ns",
        nargs="*",
        type=int,
        default=[10],
        help="n values for the paired timing run (all modes alternated in one "
        "process); empty to skip",
    )
    parser.add_argument("--rounds", type=int, default=6, help="paired timing rounds")
    parser.add_argument(
        "--no-diagnose",
        action="store_true",
        help="skip the memory_efficient diagnostics (per-block transients, saved "
        "tensors by autograd node, cost of the series pieces) at n = 10",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="let the workers import the working tree's skresflow/ directly instead "
        "of a copy frozen at the start of the run",
    )
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--markdown", default=str(DEFAULT_MD))
    parser.add_argument(
        "--no-write", action="store_true", help="print the tables only; write nothing"
    )
    # worker mode (one configuration, in this fresh process)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=(*ALL_MODES, FLOOR), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--diagnose", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--measure",
        choices=("memory", "time"),
        default="memory",
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    _apply_depth(args.depth)

    if args.worker:
        worker(args)
        return

    command = "python benchmarks/bench_logdet_memory.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    machine = machine_info()
    git_start = git_state()
    if not args.live:
        snapshot_package()
    results, t0 = [], time.perf_counter()
    configs = [
        (model, mode, n)
        for model in args.models
        for n in args.ns
        for mode in args.modes
    ]
    if not args.no_floor:
        configs += [(model, FLOOR, max(args.ns)) for model in args.models]
    for model, mode, n in configs:
        common = (
            model,
            mode,
            n,
            args.threads,
            args.repeats,
            args.activation,
            args.depth,
        )
        mem = run_config(*common, measure="memory")
        tim = run_config(*common, measure="time")
        res = {
            **mem,
            **tim,
            "memory_process_wall_s": mem["process_wall_s"],
            "process_wall_s": mem["process_wall_s"] + tim["process_wall_s"],
        }
        if mem["core_sha"] != tim["core_sha"]:
            res["core_sha"] = f"{mem['core_sha']}/{tim['core_sha']}"
        results.append(res)
        print(
            f"{model:8s} {mode:20s} n={n:2d}  peak {res['peak_mib']:8.1f} MiB  "
            f"saved {res['saved_peak_mib']:8.1f} MiB  step {res['step_s']:.3f} s "
            f"(cpu {res['step_cpu_s']:.3f} s)"
            f"  (process {res['process_wall_s']:.0f} s)",
            flush=True,
        )
    paired = []
    for model in args.models:
        for n in args.paired_ns:
            res = run_config(
                model,
                "naive",
                n,
                args.threads,
                0,
                args.activation,
                args.depth,
                rounds=args.rounds,
                measure="time",
            )
            paired.append(res)
            print(
                f"{model:8s} paired timing n={n:2d}  CPU speed vs naive: "
                + ", ".join(f"{m} {v:.2f}x" for m, v in res["speedup_cpu"].items())
                + f"  (process {res['process_wall_s']:.0f} s)",
                flush=True,
            )
    diagnostics = []
    if not args.no_diagnose:
        for model in args.models:
            common = (model, "memory_efficient", 10, args.threads, 0, args.activation)
            mem = run_config(*common, args.depth, diagnose=True, measure="memory")
            tim = run_config(*common, args.depth, diagnose=True, measure="time")
            res = {
                **mem,
                "cost_first_block_ms": tim["cost_first_block_ms"],
                "process_wall_s": mem["process_wall_s"] + tim["process_wall_s"],
            }
            if mem["core_sha"] != tim["core_sha"]:
                res["core_sha"] = f"{mem['core_sha']}/{tim['core_sha']}"
            diagnostics.append(res)
            print(
                f"{model:8s} diagnostics done (process {res['process_wall_s']:.0f} s)"
            )
    git_end = git_state()
    if SNAPSHOT:
        import shutil

        shutil.rmtree(SNAPSHOT[0], ignore_errors=True)
    shas = sorted({r["core_sha"] for r in [*results, *paired, *diagnostics]})
    payload = {
        "command": command.strip(),
        "git_start": git_start,
        "frozen_copy": not args.live,
        "git_end": git_end,
        "core_sha": shas,
        "paired_timing": paired,
        "diagnostics": diagnostics,
        "machine": machine,
        "models": args.models,
        "config": CONFIG,
        "mmap_threshold": MMAP_THRESHOLD,
        "reference": REFERENCE,
        "total_wall_s": time.perf_counter() - t0,
        "results": results,
    }
    print()
    print(markdown_tables(results, args.models, paired))
    if not args.no_write:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        write_markdown(args.markdown, payload)
        print(f"wrote {args.json} and {args.markdown}")


if __name__ == "__main__":
    main()
