import math

import numpy as np
import pytest
import torch
from sklearn.utils._param_validation import InvalidParameterError

import skresflow
from skresflow import ResidualFlowDensity
from skresflow.core import ActNorm, FactorOut, dequantize
from skresflow.datasets import load_digits_images

TINY = dict(
    n_blocks=1,
    hidden_channels=4,
    hidden_dims=(16,),
    max_iter=1,
    batch_size=64,
    random_state=0,
    n_iter_no_change=None,
)


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits_images()
    return images[:300].astype(np.float64)


@pytest.fixture(scope="module")
def fitted(digits):
    return ResidualFlowDensity(n_bins=17, **TINY).fit(digits)


def test_shapes_and_layouts(fitted, digits):
    assert fitted.event_shape_ == (1, 8, 8)
    assert fitted.score_samples(digits[:5]).shape == (5,)
    assert fitted.transform(digits[:5]).shape == (5, 64)
    assert fitted.sample(4, random_state=0).shape == (4, 8, 8)
    assert fitted.inverse_transform(fitted.transform(digits[:2])).shape == (2, 8, 8)


def test_flattened_rows_with_image_shape_match_images(fitted, digits):
    flat = ResidualFlowDensity(n_bins=17, image_shape=(1, 8, 8), **TINY)
    flat.fit(digits.reshape(len(digits), -1))
    # Two fits: the same model on the CPU; on a GPU, cuDNN's convolution
    # gradients are not bitwise reproducible (6.5e-9 relative seen on an H200).
    np.testing.assert_allclose(
        flat.score_samples(digits[:20].reshape(20, -1)),
        fitted.score_samples(digits[:20]),
        rtol=1e-10 if fitted.device_.type == "cpu" else 1e-6,
    )
    assert flat.sample(3, random_state=0).shape == (3, 64)


def test_four_dimensional_input(digits):
    est = ResidualFlowDensity(n_bins=17, **TINY).fit(digits[:, None])
    assert est.event_shape_ == (1, 8, 8)
    assert est.sample(2).shape == (2, 1, 8, 8)


def test_scores_deterministic_and_batch_independent(fitted, digits):
    full = fitted.score_samples(digits[:40])
    np.testing.assert_array_equal(fitted.score_samples(digits[:40]), full)
    np.testing.assert_allclose(fitted.score_samples(digits[5:9]), full[5:9], rtol=1e-12)


def test_bits_per_dim_arithmetic(fitted, digits):
    scores = fitted.score_samples(digits[:50])
    assert fitted.bits_per_dim(digits[:50]) == pytest.approx(
        -scores.mean() / (64 * math.log(2)), rel=1e-12
    )
    # The score is log p of the dequantised image minus D log K.
    x = torch.tensor(digits[:50, None], dtype=torch.float64)
    y, correction = dequantize(x, 17, fitted._scoring_generator(), noise="row_hash")
    assert correction == pytest.approx(-64 * math.log(17))
    with torch.no_grad():  # the flow lives on device_ (CUDA on a GPU machine)
        manual = fitted.flow_.log_prob(y.to(fitted.device_)).cpu() + correction
    np.testing.assert_allclose(scores, manual.numpy(), rtol=1e-10)


def test_bits_per_dim_of_a_known_density():
    # Independent uniform pixels on 0..K-1: any sensible model of them is close to
    # log2(K) bits/dim; the dequantisation bound can only be above it.
    rng = np.random.default_rng(0)
    X = rng.integers(0, 4, size=(400, 1, 4, 4)).astype(float)
    est = ResidualFlowDensity(n_bins=4, **{**TINY, "max_iter": 2}).fit(X)
    bpd = est.bits_per_dim(rng.integers(0, 4, size=(300, 1, 4, 4)).astype(float))
    assert 2.0 - 0.02 < bpd < 2.6


def test_dequantisation_bound_is_below_the_discrete_log_probability():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 3, size=(400, 2)).astype(float) + (rng.random((400, 1)) < 0.5)
    est = ResidualFlowDensity(n_bins=4, **{**TINY, "max_iter": 2}).fit(X)
    cell = torch.linspace(0.005, 0.995, 100, dtype=torch.float64, device=est.device_)
    offsets = torch.stack(torch.meshgrid(cell, cell, indexing="ij"), -1).reshape(-1, 2)
    for point in ([0.0, 1.0], [2.0, 2.0]):
        x = torch.tensor(point, dtype=torch.float64, device=est.device_)
        with torch.no_grad():
            log_p = est.flow_.log_prob((x + offsets) / 4)
        log_prob_discrete = (
            torch.logsumexp(log_p, 0) - math.log(len(offsets)) - 2 * math.log(4)
        )
        bound = log_p.mean() - 2 * math.log(4)
        assert bound <= log_prob_discrete + 1e-9


def test_samples_are_valid_pixels(fitted):
    samples = fitted.sample(50, random_state=1)
    assert samples.min() >= 0 and samples.max() <= 16
    np.testing.assert_array_equal(samples, np.round(samples))


def test_non_integer_pixels_are_rejected(fitted, digits):
    with pytest.raises(ValueError, match=r"must hold integers in \[0, 16\]"):
        fitted.score_samples(digits[:3] + 0.5)
    with pytest.raises(ValueError, match=r"must hold integers in \[0, 16\]"):
        ResidualFlowDensity(n_bins=17, **TINY).fit(digits + 17)


def test_wrong_image_shape(fitted, digits):
    with pytest.raises(ValueError, match=r"rows of shape \(8, 8, 1\)"):
        fitted.score_samples(digits[:3].reshape(3, 8, 8, 1))
    with pytest.raises(ValueError, match="C \\* H \\* W = 64"):
        ResidualFlowDensity(image_shape=(1, 8, 9), **TINY).fit(digits.reshape(300, -1))


def test_lipschitz_bounds_hold_for_conv_blocks(fitted):
    assert all(b < 1 for b in fitted.flow_.lipschitz_bounds())


def test_flat_discrete_rows_with_constant_pixels_stay_finite(digits):
    # Regression: constant pixels (std equal to a float32 rounding residual) were
    # standardised by ~1e-9 and the dequantisation noise blew up to 1e13 bits/dim.
    est = ResidualFlowDensity(n_bins=17, **TINY).fit(digits.reshape(300, -1))
    assert est.flow_.layers[0].scale.min() >= 1 / (17 * np.sqrt(12)) - 1e-9
    assert est.bits_per_dim(digits.reshape(300, -1)) < 20


def _actnorm_inputs(flow, x):
    """The input of every ActNorm layer of ``flow`` when ``x`` goes through it."""
    inputs = []
    hooks = [
        layer.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
        for layer in flow.layers
        if isinstance(layer, ActNorm)
    ]
    flow.configure_logdet(estimator="truncated", n_exact_terms=1)
    try:
        with torch.no_grad():
            flow(x)
    finally:
        for hook in hooks:
            hook.remove()
    return [layer for layer in flow.layers if isinstance(layer, ActNorm)], inputs


@pytest.mark.parametrize("image", [True, False])
def test_actnorm_initialisation_data(image):
    # Images and flattened rows alike: the dequantised data of training (the
    # statistics once came from the bin centres (x + 0.5) / K, where an
    # always-zero pixel has variance 0).
    images, _ = load_digits_images()
    X = torch.tensor(images[:1000], dtype=torch.float32)
    X = X[:, None] if image else X.reshape(len(X), -1)
    est = ResidualFlowDensity(n_bins=17, **TINY)
    est._validate_X(X.numpy(), reset=True)
    est._generator = torch.Generator().manual_seed(0)
    flow = est._build_flow(X, torch.ones(len(X))).double()
    data, _ = dequantize(X.double(), 17, torch.Generator().manual_seed(1))
    for actnorm, x in zip(*_actnorm_inputs(flow, data), strict=True):
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        std = flat.std(1).clamp_min(0.2**0.5)
        # Statistics of the other sample agree up to sampling error (mean over
        # features 0.03 at most here; the wrong kind of data was off by 0.10 -
        # 0.43 in log-scale).
        assert (actnorm.log_scale + std.log()).abs().mean() < 0.06
        assert ((actnorm.bias + flat.mean(1)).abs() / std).mean() < 0.06


def test_auto_max_iter_uses_the_image_step_budget(digits, monkeypatch):
    monkeypatch.setattr("skresflow._base.AUTO_STEPS", {"tabular": 2000, "image": 7})
    params = {**TINY, "max_iter": "auto", "batch_size": 10, "validation_fraction": 0}
    est = ResidualFlowDensity(n_bins=17, **params).fit(digits[:30])
    assert est.n_iter_ == 3  # ceil(7 / 3 steps per epoch)


# ------------------------------------------------------------------ factor-out
@pytest.fixture(scope="module")
def factored(digits):
    return ResidualFlowDensity(n_bins=17, factor_out=True, **TINY).fit(digits)


def test_factor_out_shapes_and_structure(factored, digits):
    outs = [m for m in factored.flow_.modules() if isinstance(m, FactorOut)]
    # 8x8 digits, three scales: 2 of the 4 squeezed channels leave at 4x4, then
    # 4 of 8 at 2x2; the fully connected blocks see the last 16 dimensions.
    assert [(m.in_shape, m.out_channels) for m in outs] == [
        ((4, 4, 4), 2),
        ((8, 2, 2), 4),
    ]
    assert factored.get_params()["factor_out"] is True
    assert factored.score_samples(digits[:5]).shape == (5,)
    assert factored.transform(digits[:5]).shape == (5, 64)
    back = factored.inverse_transform(factored.transform(digits[:4]))
    assert back.shape == (4, 8, 8)
    # transform dequantises with the row-hashed noise: the round trip lands in
    # each pixel's bin.
    np.testing.assert_array_equal(np.floor(back), digits[:4])


def test_factor_out_samples_are_valid_pixels(factored):
    samples = factored.sample(40, random_state=1)
    assert samples.shape == (40, 8, 8)
    assert samples.min() >= 0 and samples.max() <= 16
    np.testing.assert_array_equal(samples, np.round(samples))


def test_factor_out_scores_are_the_flow_log_density(factored, digits):
    x = torch.tensor(digits[:20, None], dtype=torch.float64)
    y, correction = dequantize(x, 17, factored._scoring_generator(), noise="row_hash")
    with torch.no_grad():
        manual = factored.flow_.log_prob(y.to(factored.device_)).cpu() + correction
    np.testing.assert_allclose(factored.score_samples(digits[:20]), manual, rtol=1e-10)


def test_factor_out_save_load_round_trip(factored, digits, tmp_path):
    factored.save(tmp_path / "fo.skf")
    loaded = skresflow.load(tmp_path / "fo.skf")
    assert loaded.factor_out is True
    assert any(isinstance(m, FactorOut) for m in loaded.flow_.modules())
    np.testing.assert_array_equal(
        loaded.score_samples(digits[:30]), factored.score_samples(digits[:30])
    )
    np.testing.assert_array_equal(
        loaded.sample(3, random_state=0), factored.sample(3, random_state=0)
    )


def test_factor_out_off_by_default_and_validated(fitted, digits):
    assert fitted.factor_out is False
    assert not any(isinstance(m, FactorOut) for m in fitted.flow_.modules())
    with pytest.raises(InvalidParameterError, match="'factor_out' parameter"):
        ResidualFlowDensity(factor_out="yes", **TINY).fit(digits)


def test_factor_out_is_ignored_for_tables(digits):
    est = ResidualFlowDensity(n_bins=17, factor_out=True, **TINY)
    est.fit(digits.reshape(len(digits), -1))
    assert not any(isinstance(m, FactorOut) for m in est.flow_.modules())
