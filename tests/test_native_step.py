"""The C build of one Gauss–Newton step (`stn_diffusers._speedups`) against the PyTorch step it stands in for."""

import pytest
import torch

from stn_diffusers import SpatialTransformer, gauss_newton, geometry
from tests.conftest import TINY_SEARCH_REFINE
from tests.test_search_refine import moved, similarity, smooth_field


def test_the_c_step_is_built():
    # `pip install -e .` compiles it (setup.py); without a C compiler the package falls back to the
    # PyTorch step, and these tests would then have nothing to compare.
    assert gauss_newton._speedups is not None


def problem(height: int, width: int, batch: int, padded: bool):
    """A linearised reference, the moving map stacked with its content plane, and a start θ."""
    reference = torch.cat([smooth_field(height, width, seed=seed) for seed in range(batch)])
    truth = similarity(6.0, 1.05, 0.04, -0.03, aspect=width / height).repeat(batch, 1, 1)
    moving = moved(reference, truth)
    content = torch.ones(batch, 1, height, width)
    if padded:
        content[..., :, : width // 6] = 0  # an earlier warp's padding on the left
    weights = torch.ones(batch, 1, height, width)
    weights[..., height // 3 : height // 2, :] = 0.5  # soft reference weights
    linearised = gauss_newton.linearise_reference(reference, reference_weights=weights)
    start = geometry.identity_theta(batch) + torch.tensor([[0.01, -0.02, 0.03], [0.015, 0.0, -0.01]])
    return linearised, gauss_newton.with_content(moving, content), start, truth


@pytest.mark.parametrize("robust", [False, True])
@pytest.mark.parametrize("shear_free", [False, True])
@pytest.mark.parametrize("height, width, batch, padded", [(16, 16, 3, False), (12, 20, 2, True), (64, 48, 1, True)])
def test_one_step_is_the_pytorch_step(robust, shear_free, height, width, batch, padded):
    linearised, stacked, start, _ = problem(height, width, batch, padded)
    with torch.no_grad():
        assert gauss_newton.native_step_applies(linearised, stacked, start)
        moving, content = stacked[:, :-1], stacked[:, -1:]
        expected = gauss_newton.gauss_newton_step(linearised, moving, start, robust, content, shear_free)
        found = gauss_newton._native_refine(linearised, stacked, start, 1, robust, 0.0, int(shear_free))
    assert not torch.equal(expected, start)  # the step moved θ: the comparison means something
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("height, width, batch, padded", [(16, 16, 3, False), (12, 20, 2, True), (64, 48, 1, True)])
def test_the_identity_comparison_is_the_pytorch_one(height, width, batch, padded):
    linearised, stacked, start, truth = problem(height, width, batch, padded)
    moving, content = stacked[:, :-1], stacked[:, -1:]
    turned = similarity(35.0, 0.8, 0.2, 0.1, aspect=width / height).repeat(batch, 1, 1)  # leaves much uncovered
    with torch.no_grad():
        for theta in (start, truth, turned):
            expected = gauss_newton.compare_with_identity(linearised, moving, theta, content)
            found = gauss_newton.compare_with_identity(linearised, moving, theta, content, native=True)
            for got, want in zip(found, expected):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert float(expected[2].max()) < 0.9  # the turned answer left cells uncovered


@pytest.mark.parametrize("tolerance", [0.0, 3e-4])
def test_a_refinement_ends_where_the_pytorch_one_does(tolerance, monkeypatch):
    linearised, stacked, start, truth = problem(32, 32, 2, padded=True)
    moving, content = stacked[:, :-1], stacked[:, -1:]
    steps, real_step = [], gauss_newton.gauss_newton_step

    def counted(*args):
        steps.append(1)
        return real_step(*args)

    monkeypatch.setattr(gauss_newton, "gauss_newton_step", counted)
    with torch.no_grad():
        runs = {
            native: gauss_newton.refine(
                linearised,
                moving,
                start,
                12,
                robust=True,
                tolerance=tolerance,
                moving_weights=content,
                shear_free_steps=2,
                native=native,
            )  # fmt: skip
            for native in (False, True)
        }
    torch.testing.assert_close(runs[True], runs[False], rtol=0, atol=1e-5)
    assert float(geometry.corner_error(runs[True], truth, 256, 256).max()) < 0.5  # and it aligned the pair
    assert (len(steps) < 12) == (tolerance > 0)  # the PyTorch run stopped early only with a tolerance


def test_the_pytorch_step_serves_wherever_the_c_step_does_not_apply():
    linearised, stacked, start, _ = problem(16, 16, 1, padded=False)
    with torch.no_grad():
        assert not gauss_newton.native_step_applies(linearised, stacked.double(), start)  # float64
        assert not gauss_newton.native_step_applies(linearised, stacked, geometry.to_homogeneous(start))
        homography = gauss_newton.linearise_reference(linearised.features, "homography")
        assert not gauss_newton.native_step_applies(homography, stacked, start)
    # With a gradient wanted, the PyTorch step runs even when asked for the C one, so features train.
    features = linearised.features.clone().requires_grad_(True)
    theta = gauss_newton.refine(
        gauss_newton.linearise_reference(features), stacked[:, :-1], start, 2, native=True
    )  # fmt: skip
    theta.sum().backward()
    assert features.grad is not None and bool(features.grad.abs().sum() > 0)


def test_inference_asks_for_the_c_step_and_training_does_not(monkeypatch):
    model = SpatialTransformer(**TINY_SEARCH_REFINE)
    reference = smooth_field(32, 32, seed=11)
    moving = moved(reference, similarity(12.0, 1.1, 0.05, 0.0))
    asked, real = [], gauss_newton.refine

    def spy(*args, native=False, **kwargs):
        asked.append(native)
        return real(*args, native=native, **kwargs)

    monkeypatch.setattr(gauss_newton, "refine", spy)
    model.train()
    model.predict_theta(moving, reference)
    assert asked and not any(asked)  # trained weights never depend on whether the C build is there
    asked.clear()
    model.eval()
    with torch.no_grad():
        model.predict_theta(moving, reference)
    assert asked and all(asked)
