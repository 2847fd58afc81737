"""Built-in data: the 2-D toy densities of the flow literature, and sklearn's digits.

Every generator takes ``n_samples`` and ``random_state`` and returns a float64
array of shape ``(n_samples, 2)``; none of them downloads anything.
"""

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["make_toy", "load_digits_images", "TOY_DATASETS"]


def _moons(n, rng):
    t = rng.uniform(0, np.pi, n)
    upper = rng.integers(0, 2, n).astype(bool)
    X = np.where(
        upper[:, None],
        np.stack([np.cos(t), np.sin(t)], 1),
        np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1),
    )
    return X + 0.05 * rng.standard_normal((n, 2))


def _checkerboard(n, rng):
    # 4x4 board on [-4, 4]^2: a square is filled when its row and column indices
    # have the same parity.
    col = rng.integers(0, 4, n)
    row = 2 * rng.integers(0, 2, n) + col % 2
    X = np.stack([col + rng.uniform(0, 1, n), row + rng.uniform(0, 1, n)], 1)
    return 2 * X - 4


def _eight_gaussians(n, rng):
    angles = 2 * np.pi * rng.integers(0, 8, n) / 8
    centers = 2.8 * np.stack([np.cos(angles), np.sin(angles)], 1)
    return centers + 0.25 * rng.standard_normal((n, 2))


def _two_spirals(n, rng):
    t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
    arm = rng.integers(0, 2, n) * 2 - 1
    X = np.stack([t * np.cos(t), t * np.sin(t)], 1) * arm[:, None] / 3
    return X + 0.1 * rng.standard_normal((n, 2))


def _pinwheel(n, rng, n_arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    arm = rng.integers(0, n_arms, n)
    r = rng.normal(1, radial_std, n)
    radius, tangent = r, rng.normal(0, tangential_std, n)
    angle = 2 * np.pi * arm / n_arms + rate * np.exp(r)
    rot = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)], 1)
    rot = rot.reshape(n, 2, 2)
    return 2 * np.einsum("nij,nj->ni", rot, np.stack([radius, tangent], 1))


def _rings(n, rng):
    ring = rng.integers(0, 4, n)
    radius = (ring + 1) * 0.9
    angle = rng.uniform(0, 2 * np.pi, n)
    X = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return X + 0.08 * rng.standard_normal((n, 2))


_TOYS = {
    "moons": _moons,
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "pinwheel": _pinwheel,
    "rings": _rings,
}
TOY_DATASETS = tuple(_TOYS)


def make_toy(name, n_samples=4000, *, random_state=None):
    """Sample a 2-D toy density.

    Parameters
    ----------
    name : {"moons", "checkerboard", "8gaussians", "2spirals", "pinwheel", "rings"}
    n_samples : int, default=4000
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    X : ndarray of shape (n_samples, 2)

    Examples
    --------
    >>> make_toy("rings", 5, random_state=0).shape
    (5, 2)
    """
    if name not in _TOYS:
        raise ValueError(f"name must be one of {TOY_DATASETS}; got {name!r} instead.")
    seed = check_random_state(random_state).randint(np.iinfo(np.int32).max)
    return np.asarray(
        _TOYS[name](int(n_samples), np.random.default_rng(seed)), dtype=np.float64
    )


def load_digits_images():
    """sklearn's 8x8 digits as integer images with values 0..16 (``n_bins=17``).

    Returns
    -------
    images : ndarray of shape (1797, 8, 8), int64
    target : ndarray of shape (1797,), int64
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.int64), digits.target.astype(np.int64)
