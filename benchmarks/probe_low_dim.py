#!/usr/bin/env python
"""Ablations of the 2-D defaults that need a change inside the package.

Fits ``ResidualFlowDensity(random_state=0)`` (package defaults) on
``make_toy(name, 4000, random_state=0)`` and scores a validation sample
(``make_toy(name, 4000, random_state=2)``; never the benchmark's test sample),
after patching the package in this process only:

* ``inf``: every dense layer's weight divided by ``max(1, ||W||_inf / coeff)``
  (largest absolute row sum) instead of its spectral norm, so each residual
  branch is a contraction in the infinity norm: still invertible (Banach's
  theorem holds in any norm) with ``det(I + J) > 0`` (the spectral radius is
  below every induced norm); the paper's "induced mixed norms" reported that
  infinity norms help low-dimensional data. The spectral-norm checks of the
  package are switched off for the run (such weights may have spectral norm
  above 1), so only the forward pass (scoring) is meaningful here.
* ``beta<b>``: LipSwish's initial slope ``softplus(raw) = b`` (0.97 by default).

One torch thread; one JSON line per run on stdout.

Usage::

    python benchmarks/probe_low_dim.py rings inf
    python benchmarks/probe_low_dim.py checkerboard beta4
"""

import argparse
import json
import math
import time

import torch

import skresflow.core.activations as activations
import skresflow.core.blocks as blocks
import skresflow.core.flow as flow_module
import skresflow.core.lipschitz as lipschitz
from skresflow import ResidualFlowDensity
from skresflow.datasets import TOY_DATASETS, make_toy


def use_infinity_norm():
    def normalized_weight(self):
        shared = getattr(self, "_shared_weight", None)
        if shared is not None and (shared.requires_grad or not torch.is_grad_enabled()):
            return shared
        w = self.weight
        return w / torch.clamp(w.abs().sum(1).max() / self.coeff, min=1.0)

    lipschitz.LipschitzLinear.normalized_weight = normalized_weight
    lipschitz._normalized_together = lambda layers: [
        layer.normalized_weight() for layer in layers
    ]
    lipschitz.LipschitzLinear.refresh = lambda self, force=False: 0
    flow_module.refresh_layers = lipschitz.refresh_layers = lambda layers: None
    blocks.ResidualBlock.estimated_lipschitz = lambda self: 0.5


def use_initial_slope(beta):
    raw = math.log(math.expm1(beta))
    init = activations.LipSwish.__init__
    activations.LipSwish.__init__ = lambda self, beta_init=raw: init(self, beta_init)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", choices=TOY_DATASETS)
    parser.add_argument("variant", help="inf, or beta<slope> (e.g. beta4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.variant == "inf":
        use_infinity_norm()
    elif args.variant.startswith("beta"):
        use_initial_slope(float(args.variant[4:]))
    else:
        parser.error(f"unknown variant {args.variant!r}")
    X = make_toy(args.dataset, 4000, random_state=0)
    V = make_toy(args.dataset, 4000, random_state=2)
    start = time.process_time()
    est = ResidualFlowDensity(random_state=0).fit(X)
    print(json.dumps(dict(dataset=args.dataset, variant=args.variant,
                          validation_ll=float(est.score(V)),
                          cpu_s=time.process_time() - start, epochs=est.n_iter_)))


if __name__ == "__main__":
    main()
