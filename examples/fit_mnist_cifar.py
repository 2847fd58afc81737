"""Fit a residual flow to MNIST or CIFAR-10 arrays you already have (not run in CI).

    python examples/fit_mnist_cifar.py mnist --max-iter 10 --device cuda
    python examples/fit_mnist_cifar.py cifar10 --data cifar_train.npy --paper

Data: a .npy file of uint8 images, (n, H, W) or (n, C, H, W); without --data the
script loads the training set with torchvision if it is installed (it downloads
into ./data). --paper uses the paper's configuration (a GPU job); the default is
a smaller model that trains on a CPU.
"""

import argparse

import numpy as np

from skresflow import ResidualFlowDensity
from skresflow.presets import paper_config


def load(dataset, path):
    if path:
        return np.load(path)
    try:
        import torchvision
    except ImportError:
        raise SystemExit("pass --data FILE.npy or install torchvision") from None
    cls = (
        torchvision.datasets.MNIST
        if dataset == "mnist"
        else torchvision.datasets.CIFAR10
    )
    data = cls("data", train=True, download=True).data
    data = np.asarray(data)
    return data if data.ndim == 3 else np.moveaxis(data, -1, 1)  # CIFAR: NHWC -> NCHW


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset", choices=("mnist", "cifar10"))
    parser.add_argument("--data")
    parser.add_argument("--paper", action="store_true")
    parser.add_argument("--max-iter", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="model.skf")
    args = parser.parse_args()

    X = load(args.dataset, args.data).astype(np.float64)
    params = paper_config(args.dataset) if args.paper else {"n_bins": 256}
    est = ResidualFlowDensity(
        **params, max_iter=args.max_iter, device=args.device, verbose=1, random_state=0
    )
    est.fit(X[:-5000])
    print(f"held-out bits/dim: {est.bits_per_dim(X[-5000:]):.4f}")
    est.save(args.out)


if __name__ == "__main__":
    main()
