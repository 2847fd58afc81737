"""GPU checks (marked ``gpu``; skipped without CUDA, see conftest.py).

Run on a CUDA machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from skresflow import ResidualFlowDensity, load
from skresflow.datasets import make_toy

pytestmark = pytest.mark.gpu

SMALL = dict(n_blocks=2, hidden_dims=(16,), max_iter=3, batch_size=64, random_state=0)


@pytest.fixture(scope="module")
def moons():
    return make_toy("moons", 600, random_state=0)


@pytest.fixture(scope="module")
def gpu_fit(moons):
    return ResidualFlowDensity(**SMALL, device="cuda").fit(moons)


def test_auto_device_is_cuda_and_outputs_are_numpy(moons):
    est = ResidualFlowDensity(**SMALL).fit(moons)
    assert est.device_.type == "cuda"
    assert next(est.flow_.parameters()).device.type == "cuda"
    scores = est.score_samples(moons[:50])
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores))
    samples = est.sample(20, random_state=0)
    assert isinstance(samples, np.ndarray) and samples.shape == (20, 2)


def test_gpu_and_cpu_fits_agree_in_quality(moons, gpu_fit):
    cpu = ResidualFlowDensity(**SMALL, device="cpu").fit(moons)
    # Same seed, different kernels: not bit-identical, but the same model class
    # trained the same way must land close.
    assert abs(gpu_fit.score(moons) - cpu.score(moons)) < 0.2


def test_cuda_index_is_respected(moons):
    est = ResidualFlowDensity(**SMALL, device="cuda:0").fit(moons)
    assert est.device_ == torch.device("cuda:0")


def test_gpu_model_unpickles_on_a_cpu_only_process(gpu_fit, moons, tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(gpu_fit))
    expected = gpu_fit.score_samples(moons[:20])
    np.save(tmp_path / "X.npy", moons[:20])
    code = (
        "import pickle, sys, warnings, numpy as np\n"
        "warnings.simplefilter('ignore')\n"
        f"est = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        "assert est.device_.type == 'cpu', est.device_\n"
        f"np.save({str(tmp_path / 'cpu.npy')!r}, "
        f"est.score_samples(np.load({str(tmp_path / 'X.npy')!r})))\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    np.testing.assert_allclose(np.load(tmp_path / "cpu.npy"), expected, atol=1e-4)


def test_safe_file_from_gpu_loads_on_cpu(gpu_fit, moons, tmp_path):
    path = tmp_path / "model.skf"
    gpu_fit.save(path)
    cpu = load(path, device="cpu")
    assert cpu.device_.type == "cpu"
    np.testing.assert_allclose(
        cpu.score_samples(moons[:20]), gpu_fit.score_samples(moons[:20]), atol=1e-4
    )


def test_fit_leaves_global_cuda_rng_alone(moons):
    state = torch.cuda.get_rng_state()
    ResidualFlowDensity(**SMALL, device="cuda").fit(moons)
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_same_random_state_same_gpu_model(moons, gpu_fit):
    again = ResidualFlowDensity(**SMALL, device="cuda").fit(moons)
    np.testing.assert_allclose(
        again.score_samples(moons[:50]), gpu_fit.score_samples(moons[:50]), atol=1e-5
    )


def test_image_classifier_and_outlier_detector_fit_on_gpu():
    from skresflow import ResidualFlowClassifier, ResidualFlowOutlierDetector
    from skresflow.datasets import load_digits_images

    images, labels = load_digits_images()
    X, y = images[:200, None], labels[:200]
    tiny = dict(n_blocks=1, hidden_channels=8, n_bins=17, max_iter=2, random_state=0)
    clf = ResidualFlowClassifier(**tiny, device="cuda").fit(X, y)
    assert clf.device_.type == "cuda"
    assert clf.predict_proba(X[:10]).shape == (10, len(np.unique(y)))
    det = ResidualFlowOutlierDetector(**tiny, device="cuda").fit(X)
    assert set(np.unique(det.predict(X[:20]))) <= {-1, 1}
