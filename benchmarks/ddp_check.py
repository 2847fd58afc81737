#!/usr/bin/env python
"""Data-parallel fit under ``torchrun``: do all ranks end with the same model?

Each rank fits its own uneven slice of a toy data set; rank 0 then prints the
largest parameter difference between ranks, the held-out log-likelihood, and
the same of a single-process fit on the union (for quality).

Usage::

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_check.py \\
        --backend gloo --device cpu
    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_check.py \\
        --backend nccl --device auto          # one GPU per process
"""

import argparse
import json
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from skresflow import ResidualFlowDensity
from skresflow.datasets import make_toy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-iter", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    X, X_test = (
        make_toy("moons", n, random_state=s) for n, s in ((4000, 0), (2000, 1))
    )
    # Uneven shards: rank r gets a share proportional to r + 2.
    bounds = np.cumsum([0] + [r + 2 for r in range(world)])
    bounds = (bounds / bounds[-1] * len(X)).astype(int)
    params = dict(
        n_blocks=4,
        hidden_dims=(32,),
        max_iter=args.max_iter,
        batch_size=256,
        n_iter_no_change=None,
        random_state=0,
        device=args.device,
    )
    t0 = time.perf_counter()
    est = ResidualFlowDensity(**params).fit(X[bounds[rank] : bounds[rank + 1]])
    seconds = time.perf_counter() - t0
    flat = torch.cat(
        [p.detach().double().flatten().cpu() for p in est.flow_.parameters()]
    )
    parts = [None] * world
    dist.all_gather_object(parts, flat)
    dist.destroy_process_group()  # a fit inside the group would be data-parallel
    if rank == 0:
        diff = max(float((p - parts[0]).abs().max()) for p in parts)
        single = ResidualFlowDensity(**{**params, "device": est.device_}).fit(X)
        result = {
            "backend": args.backend,
            "world_size": world,
            "device": str(est.device_),
            "max_param_diff_between_ranks": diff,
            "test_loglik_data_parallel": est.score(X_test),
            "test_loglik_single_process": single.score(X_test),
            "fit_seconds_rank0": round(seconds, 2),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
