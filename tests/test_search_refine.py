"""The search-refine design (the `registration` preset): search, Gauss–Newton, features, training."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from stn_diffusers import STN_PRESETS, SpatialTransformer, gauss_newton, geometry, similarity_search
from stn_diffusers.finetune import main as finetune_main
from stn_diffusers.finetune import parse_args
from stn_diffusers.losses import training_loss
from stn_diffusers.models import search_refine_localizer
from tests.conftest import TINY_SEARCH_REFINE


def smooth_field(height: int, width: int, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """``(1, C, H, W)`` random structure at several scales: textured like latents, smooth enough to align."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.zeros(1, channels, height, width)
    for cells in (4, 8, 16):
        coarse = torch.randn(1, channels, max(2, height // cells), max(2, width // cells), generator=generator)
        field += F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return field


def similarity(degrees: float, scale: float, tx: float = 0.0, ty: float = 0.0, aspect: float = 1.0) -> torch.Tensor:
    """θ ``(1, 2, 3)`` of a rotation and scale about the centre, then a shift (normalised units)."""
    theta = similarity_search.similarity_candidates(torch.tensor([degrees]), torch.tensor([scale]), aspect)
    theta[:, 0, 2], theta[:, 1, 2] = tx, ty
    return theta


def moved(reference: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The moving latents that ``theta`` aligns onto ``reference`` (border-padded, as a larger photo would be)."""
    return geometry.warp(reference, geometry.invert_theta(theta), padding_mode="border")


def error_px(theta: torch.Tensor, truth: torch.Tensor, height: int, width: int) -> float:
    """Mean corner error in pixels of the 8× larger image the latents stand for."""
    return float(geometry.corner_error(theta, truth, 8 * height, 8 * width).max())


@pytest.fixture
def model() -> SpatialTransformer:
    return SpatialTransformer(**TINY_SEARCH_REFINE).eval()


class TestSimilaritySearch:
    def test_default_candidates_contain_the_identity(self):
        rotations = similarity_search.default_rotations(45.0, 10.0)
        scales = similarity_search.default_scales(1.4, 1.12)
        assert rotations.numel() % 2 == 1 and rotations.abs().min() == 0 and rotations.max() == 45.0
        assert scales.numel() % 2 == 1 and torch.isclose(scales.median(), torch.tensor(1.0))
        assert (scales[1:] / scales[:-1]).max() <= 1.12 + 1e-6 and scales.max() == pytest.approx(1.4)

    def test_shift_scores_match_a_direct_computation(self):
        generator = torch.Generator().manual_seed(0)
        reference = torch.randn(2, 3, 9, 11, generator=generator)
        moving = torch.randn(2, 4, 3, 9, 11, generator=generator)
        coverage = (torch.rand(2, 4, 1, 9, 11, generator=generator) > 0.2).float()
        moving = moving * coverage
        radius = 3
        scores = similarity_search.shift_scores(reference, moving, coverage, radius)
        # Direct: shift the moving map by (dy, dx) with zeros entering, sum over the overlap.
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                padded = F.pad(moving, (radius, radius, radius, radius))
                padded_cover = F.pad(coverage, (radius, radius, radius, radius))
                window = (..., slice(radius + dy, radius + dy + 9), slice(radius + dx, radius + dx + 11))
                shifted, cover = padded[window], padded_cover[window]
                product = (reference.unsqueeze(1) * shifted).sum(dim=(2, 3, 4))
                ref_energy = (reference.pow(2).sum(1, keepdim=True).unsqueeze(1) * cover).sum(dim=(2, 3, 4))
                mov_energy = shifted.pow(2).sum(dim=(2, 3, 4))
                overlap = cover.sum(dim=(2, 3, 4)) / (9 * 11)
                expected = product / (ref_energy * mov_energy).sqrt() * overlap**similarity_search.OVERLAP_EXPONENT
                torch.testing.assert_close(scores[:, :, dy + radius, dx + radius], expected, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("degrees, scale", [(0.0, 1.0), (30.0, 1.0), (-40.0, 1.2), (20.0, 0.8)])
    def test_finds_the_candidate_nearest_the_truth(self, degrees, scale):
        reference = similarity_search.standardise(F.avg_pool2d(smooth_field(64, 64), 4))
        truth = similarity(degrees, scale, 0.1, -0.05)
        moving = similarity_search.standardise(F.avg_pool2d(moved(smooth_field(64, 64), truth), 4))
        rotations = similarity_search.default_rotations(45.0, 10.0)
        scales = similarity_search.default_scales(1.4, 1.12)
        theta, score = similarity_search.search_similarity(reference, moving, rotations, scales, radius=5)
        linear = theta[0, :, :2]
        found_degrees = math.degrees(math.atan2(float(linear[1, 0]), float(linear[0, 0])))
        assert abs(found_degrees - degrees) <= 5.0 + 1e-3  # half a rotation step
        assert abs(math.log(float(linear.det().sqrt())) - math.log(scale)) <= math.log(1.12) / 2 + 0.02
        assert 0 < float(score) <= 1.0

    def test_the_kept_coverage_of_a_map_without_padding_scores_as_its_warped_content_plane(self):
        # Without moving weights, each candidate's coverage and its spectrum are kept once per grid.
        reference = similarity_search.standardise(F.avg_pool2d(smooth_field(64, 48), 4))
        moving = similarity_search.standardise(F.avg_pool2d(moved(smooth_field(64, 48), similarity(25.0, 1.1)), 4))
        rotations = similarity_search.default_rotations(45.0, 10.0)
        scales = similarity_search.default_scales(1.4, 1.12)
        search = lambda weights: similarity_search.search_similarity(  # noqa: E731
            reference, moving, rotations, scales, radius=5, top_k=3, moving_weights=weights
        )
        kept, kept_scores = search(None)
        warped, warped_scores = search(torch.ones(1, 1, 16, 12))  # every cell content, the general path
        torch.testing.assert_close(kept, warped)
        torch.testing.assert_close(kept_scores, warped_scores)

    def test_a_batch_finds_what_each_pair_finds_alone(self):
        # The candidates' sampling grids are cached once per grid and repeated along the batch.
        rotations = similarity_search.default_rotations(45.0, 10.0)
        scales = similarity_search.default_scales(1.4, 1.12)
        references, movings = [], []
        for seed, (degrees, scale) in enumerate([(30.0, 1.0), (-20.0, 1.2)]):
            field = smooth_field(64, 64, seed=seed)
            references.append(similarity_search.standardise(F.avg_pool2d(field, 4)))
            truth = similarity(degrees, scale, 0.05, 0.0)
            movings.append(similarity_search.standardise(F.avg_pool2d(moved(field, truth), 4)))
        search = lambda reference, moving: similarity_search.search_similarity(  # noqa: E731
            reference, moving, rotations, scales, radius=5, top_k=3
        )
        batched, batched_scores = search(torch.cat(references), torch.cat(movings))
        for index in range(2):
            alone, alone_scores = search(references[index], movings[index])
            torch.testing.assert_close(batched[index : index + 1], alone)
            torch.testing.assert_close(batched_scores[index : index + 1], alone_scores)
        assert not torch.allclose(batched[0], batched[1])  # two different answers, not one repeated


class TestGaussNewton:
    @pytest.mark.parametrize("transform", ["affine", "homography"])
    def test_converges_to_an_exact_warp_from_nearby(self, transform):
        reference = smooth_field(64, 64)
        truth = geometry.compose_theta(
            similarity(3.0, 1.03, 0.02, -0.01), torch.tensor([[[1.0, 0.02, 0.0], [0.0, 0.98, 0.0]]])
        )
        if transform == "homography":
            truth = geometry.compose_theta(
                truth, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.02, -0.01, 1.0]]])
            )
        moving = moved(reference, truth)
        linearised = gauss_newton.linearise_reference(reference, transform)
        start = geometry.identity_theta(1)
        theta = gauss_newton.refine(linearised, moving, start, iterations=10)
        assert theta.shape == truth.shape
        assert error_px(theta, truth, 64, 64) < 0.5 < error_px(start, truth, 64, 64)

    def test_shear_free_steps_fit_rotation_and_axis_scales_but_not_a_shear(self):
        height, width = 48, 64  # non-square: a rotation mixes the normalised axes by the aspect ratio
        reference = smooth_field(height, width, seed=3)
        stretch = torch.tensor([[[1.03, 0.0, 0.0], [0.0, 0.97, 0.0]]])
        free = geometry.compose_theta(similarity(4.0, 1.02, 0.03, -0.02, aspect=width / height), stretch)
        # A symmetric shear of 0.06 in pixels: in normalised units the off-diagonals scale by the aspect.
        shear = torch.tensor([[[1.0, 0.06 * height / width, 0.0], [0.06 * width / height, 1.0, 0.0]]])
        linearised = gauss_newton.linearise_reference(reference)
        start = geometry.identity_theta(1)
        errors = {}
        for name, truth in (("free", free), ("shear", shear)):
            moving = moved(reference, truth)
            for steps in (0, 10):
                theta = gauss_newton.refine(linearised, moving, start, iterations=10, shear_free_steps=steps)
                errors[name, steps] = error_px(theta, truth, height, width)
        # Steps in the shear-free tangent compose to a rotation of a stretch up to a little shear.
        assert errors["free", 10] < 1.0 and errors["free", 0] < 0.5, errors
        assert errors["shear", 0] < 0.5 < 5.0 < errors["shear", 10], errors  # no step could fit the shear

    def test_the_shear_free_basis_spans_rotation_scales_and_shift(self):
        basis = gauss_newton.shear_free_basis(12, 24, 8, torch.float64, torch.device("cpu"))
        assert basis.shape == (8, 5) and not basis[6:].any()  # no perspective step
        rotation = gauss_newton.params_to_matrix(1e-4 * basis[:, 2][None])[0, :2, :2] - torch.eye(
            2, dtype=torch.float64
        )
        # The rotation generator in normalised units of a 24 × 12 grid (aspect 2): [[0, -1/2], [2, 0]].
        torch.testing.assert_close(rotation / 1e-4, torch.tensor([[0.0, -0.5], [2.0, 0.0]], dtype=torch.float64))

    @pytest.mark.parametrize("transform", ["affine", "homography"])
    def test_sampling_grid_is_affine_grids_convention(self, transform):
        theta = similarity(7.0, 1.1, 0.05, -0.02)
        if transform == "homography":
            tilt = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.03, -0.02, 1.0]]])
            theta = geometry.compose_theta(theta, tilt)
        like = torch.zeros(1, 4, 12, 20)
        identity_grid = F.affine_grid(geometry.identity_theta(1), [1, 1, 12, 20], align_corners=False)
        expected = geometry.apply_theta(theta, identity_grid.flatten(1, 2)).view(1, 12, 20, 2)
        torch.testing.assert_close(gauss_newton.sampling_grid(theta, 12, 20, like), expected)

    def test_identity_is_costed_as_the_unwarped_map(self):
        # compare_with_identity reads the identity's side without resampling: the same as warping by it.
        reference, moving = smooth_field(32, 32), smooth_field(32, 32, seed=1)
        content = torch.ones(1, 1, 32, 32)
        content[..., :, :5] = 0  # the moving map's padding
        linearised = gauss_newton.linearise_reference(reference)
        identity = geometry.identity_theta(1)
        shortcut = gauss_newton._warp_and_match(linearised, moving, None, content)
        sampled = gauss_newton._warp_and_match(linearised, moving, identity, content)
        torch.testing.assert_close(shortcut[0], sampled[0])
        torch.testing.assert_close(shortcut[1], sampled[1])
        answer, at_identity, _ = gauss_newton.compare_with_identity(linearised, moving, identity, content)
        torch.testing.assert_close(answer, at_identity)

    def test_ignored_cells_do_not_pull_the_fit(self):
        reference = smooth_field(64, 64)
        truth = similarity(2.0, 1.02, 0.03, 0.0)
        moving = moved(reference, truth)
        corrupted = reference.clone()
        corrupted[..., 10:40, 10:40] = 5 * torch.randn(1, 4, 30, 30, generator=torch.Generator().manual_seed(3))
        weights = torch.ones(1, 1, 64, 64)
        weights[..., 10:40, 10:40] = 0
        kept = gauss_newton.linearise_reference(corrupted, reference_weights=weights)
        theta = gauss_newton.refine(kept, moving, geometry.identity_theta(1), 10, robust=False)
        assert error_px(theta, truth, 64, 64) < 0.5

    def test_cost_is_lowest_at_the_truth(self):
        reference = smooth_field(64, 64)
        truth = similarity(5.0, 0.9)  # zoomed in: every reference cell stays covered
        moving = moved(reference, truth)
        linearised = gauss_newton.linearise_reference(reference)
        at_truth, identity, shared = gauss_newton.compare_with_identity(linearised, moving, truth)
        assert float(at_truth) < 0.1 * float(identity)
        assert 0.9 < float(shared) <= 1.0

    def test_uncovered_corners_do_not_count_against_a_rotation(self):
        # A true rotation leaves the reference's corners uncovered: there the answer counts what the
        # identity counts, so the truth still fits far better (it did not when uncovered cells cost
        # the cap: smooth maps lost to the identity).
        reference = smooth_field(32, 32, seed=3)
        truth = similarity(20.0, 1.0)
        linearised = gauss_newton.linearise_reference(reference)
        at_truth, identity, shared = gauss_newton.compare_with_identity(linearised, moved(reference, truth), truth)
        assert float(shared) < 0.95  # the corners are out
        assert float(at_truth) < 0.2 * float(identity)

    def test_a_large_local_change_does_not_make_a_shift_look_better(self):
        # 30 % of an aligned moving map replaced: the identity's median cell still fits (up to the
        # brightness matching the change disturbs), and no shift beats it, whichever way it looks.
        reference = smooth_field(64, 64, seed=13)
        moving = reference.clone()
        moving[..., :, 45:] = smooth_field(64, 19, seed=14)
        linearised = gauss_newton.linearise_reference(reference)
        for shift in (-0.3, -0.1, 0.1, 0.3):
            shifted, identity, _ = gauss_newton.compare_with_identity(linearised, moving, similarity(0.0, 1.0, shift))
            assert float(identity) < 0.1 * float(shifted)


class TestSearchRefineDesign:
    @pytest.mark.parametrize("size", [(16, 16), (32, 48), (64, 64), (48, 32), (40, 72)])
    def test_any_size_from_the_minimum(self, model, size):
        sample, reference = smooth_field(*size, seed=1), smooth_field(*size, seed=2)
        out = model(sample, reference)
        assert out.sample.shape == sample.shape and out.theta.shape == (1, 2, 3)
        assert torch.isfinite(out.theta).all()
        assert model.min_sample_size == 16 and model.fixed_sample_size is None

    def test_refuses_a_sample_below_the_minimum(self, model):
        with pytest.raises(ValueError, match="at least 16×16"):
            model(torch.randn(1, 4, 12, 12), torch.randn(1, 4, 12, 12))

    @pytest.mark.parametrize("size", [(64, 64), (48, 80)])
    @pytest.mark.parametrize(
        "degrees, scale, shift", [(0.0, 1.0, (0.15, -0.1)), (25.0, 1.15, (0.1, 0.1)), (-40.0, 0.8, (-0.1, 0.05))]
    )
    def test_recovers_wide_motions_untrained(self, model, size, degrees, scale, shift):
        height, width = size
        reference = smooth_field(height, width, seed=4)
        truth = similarity(degrees, scale, *shift, aspect=width / height)
        with torch.no_grad():
            theta = model.predict_theta(moved(reference, truth), reference)
        assert error_px(theta, truth, height, width) < 2.0

    def test_aligned_pairs_come_back_as_the_identity(self, model):
        reference = smooth_field(64, 64, seed=5)
        changed = reference.clone()
        changed[..., 20:36, 30:50] = smooth_field(16, 20, seed=6)  # a local change, no motion
        brighter = 1.3 * reference + 0.2
        with torch.no_grad():
            for moving in (reference, changed, brighter):
                theta = model.predict_theta(moving, reference)
                torch.testing.assert_close(theta, geometry.identity_theta(1), rtol=0, atol=0)

    def test_reference_weights_shape_the_estimate(self, model):
        reference = smooth_field(64, 64, seed=7)
        truth = similarity(10.0, 1.05, 0.05, 0.0)
        moving = moved(reference, truth)
        corrupted = reference.clone()
        corrupted[..., :, :28] = torch.randn(1, 4, 64, 28, generator=torch.Generator().manual_seed(8))
        weights = torch.ones(1, 1, 64, 64)
        weights[..., :, :28] = 0
        with torch.no_grad():
            theta = model.predict_theta(moving, corrupted, reference_weights=weights)
        assert error_px(theta, truth, 64, 64) < 2.0

    def test_an_answer_covering_little_of_the_reference_is_not_trusted(self, model):
        # A pure shift of 75 % of the side leaves 25 % of the reference covered: below MIN_SHARED_CELLS,
        # so the identity stands even though the refined answer fits its sliver.
        from stn_diffusers.models import search_refine_localizer

        assert search_refine_localizer.MIN_SHARED_CELLS > 0.25
        reference = smooth_field(64, 64, seed=12)
        truth = similarity(0.0, 1.0, 1.5, 0.0)
        wide = SpatialTransformer(**{**TINY_SEARCH_REFINE, "search_translation": 0.9})
        with torch.no_grad():
            wide.train()  # training mode skips the identity test: the search does find the sliver
            assert error_px(wide.predict_theta(moved(reference, truth), reference), truth, 64, 64) < 2.0
            wide.eval()
            theta = wide.predict_theta(moved(reference, truth), reference)
        torch.testing.assert_close(theta, geometry.identity_theta(1), rtol=0, atol=0)

    def test_candidates_are_told_apart_after_coarse_refinement(self, model):
        # Of a wrong start and one near the truth, the selection keeps the one that fits after the
        # coarsest Gauss–Newton level, whatever their order.
        reference = smooth_field(64, 64, seed=10)
        truth = similarity(25.0, 1.15, 0.1, -0.05)
        moving = moved(reference, truth)
        near, wrong = similarity(22.0, 1.12, 0.08, -0.04), similarity(-30.0, 0.8, -0.2, 0.1)
        localizer = model.localizer
        with torch.no_grad():
            context = localizer.prepare(reference)
            features = localizer.localization(moving)
            for starts in (torch.stack([near, wrong], 1), torch.stack([wrong, near], 1)):
                chosen = localizer._select(context, features, starts)
                assert error_px(chosen, truth, 64, 64) < error_px(near, truth, 64, 64)

    def test_homography_transform_returns_and_refines_a_homography(self):
        model = SpatialTransformer(**{**TINY_SEARCH_REFINE, "transform": "homography"}).eval()
        reference = smooth_field(64, 64, seed=9)
        perspective = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.05, -0.03, 1.0]]])
        truth = geometry.compose_theta(similarity(15.0, 1.1, 0.05, 0.0), perspective)
        with torch.no_grad():
            theta = model.predict_theta(moved(reference, truth), reference)
        assert theta.shape == (1, 3, 3)
        assert error_px(theta, truth, 64, 64) < 2.0

    @pytest.mark.parametrize("option, value", [
        ("conditioning", "none"), ("transform", "similarity"), ("refine_strides", (2, 2)),
        ("refine_iterations", (4,)), ("search_scale", 0.9), ("search_translation", 1.5), ("feature_dim", 2),
        ("search_candidates", 0), ("inference_refine_iterations", (4, 4)), ("inference_refine_iterations", (4, 0, 4)),
        ("inference_shear_free_steps", (4, 2)), ("inference_shear_free_steps", (4, -1, 0)),
    ])  # fmt: skip
    def test_bad_configs_name_the_expected_value(self, option, value):
        with pytest.raises(ValueError, match="expected"):
            SpatialTransformer(**{**TINY_SEARCH_REFINE, option: value})


def record_steps(monkeypatch, **config) -> tuple[SpatialTransformer, torch.Tensor, torch.Tensor, list]:
    """A tiny model with ``config``, a ``(moving, reference)`` pair 12° apart, and the list every
    Gauss–Newton step appends ``(grid side, shear_free)`` to; inference takes every allowed step."""
    model = SpatialTransformer(**{**TINY_SEARCH_REFINE, **config})
    reference = smooth_field(32, 32, seed=11)
    moving = moved(reference, similarity(12.0, 1.1, 0.05, 0.0))
    # The PyTorch step, one call per step (the C build runs a whole level in one call; its steps are
    # checked against these in tests/test_native_step.py).
    monkeypatch.setattr(gauss_newton, "_speedups", None)
    steps, real_step = [], gauss_newton.gauss_newton_step

    def spy(linearised, moving, theta, robust=True, moving_weights=None, shear_free=False):
        steps.append((linearised.features.shape[-1], shear_free))
        return real_step(linearised, moving, theta, robust, moving_weights, shear_free)

    monkeypatch.setattr(gauss_newton, "gauss_newton_step", spy)
    monkeypatch.setattr(search_refine_localizer, "CONVERGED", 0.0)  # no early stop at inference
    return model, moving, reference, steps


def test_training_unrolls_refine_iterations_and_inference_caps_at_inference_refine_iterations(monkeypatch):
    model, moving, reference, steps = record_steps(monkeypatch, inference_refine_iterations=(4, 6, 9))
    model.train()
    model.predict_theta(moving, reference)
    sizes = [size for size, _ in steps]
    assert [sizes.count(size) for size in (8, 16, 32)] == [4 + 4, 4, 4]  # selection, then every level again
    steps.clear()
    model.eval()
    with torch.no_grad():
        model.predict_theta(moving, reference)
    sizes = [size for size, _ in steps]
    assert [sizes.count(size) for size in (8, 16, 32)] == [4, 6, 9]


class TestPlausible:
    @pytest.mark.parametrize("height, width", [(64, 64), (48, 64)])
    def test_answers_within_the_searched_range_are_plausible(self, model, height, width):
        aspect = width / height
        inside = torch.cat([
            geometry.identity_theta(1),
            similarity(45.0, 1.4, 0.3, -0.3, aspect=aspect),  # a true rotation in pixels, the widest searched
            similarity(-30.0, 1 / 1.4, -0.5, 0.2, aspect=aspect),
            torch.tensor([[[1.3, 0.1, 0.0], [0.0, 0.75, 0.0]]]),  # `huge`: each axis scaled on its own
        ])  # fmt: skip
        assert model.localizer._plausible(inside, height, width).all()

    def test_squashed_sheared_or_far_shifted_answers_are_not(self, model):
        outside = torch.cat([
            torch.tensor([[[1.72, -0.75, -0.3], [0.34, 0.84, -0.3]]]),  # answers held-out aligned pairs got
            torch.tensor([[[1.06, -0.13, -0.09], [0.31, 0.56, -0.41]]]),
            torch.tensor([[[0.86, 0.04, -0.87], [0.07, 0.88, 0.10]]]),  # a shift beyond the search's reach
            similarity(0.0, 2.0),
        ])  # fmt: skip
        assert not model.localizer._plausible(outside, 64, 64).any()

    def test_a_homography_is_never_held_to_the_affine_range(self):
        model = SpatialTransformer(**{**TINY_SEARCH_REFINE, "transform": "homography"})
        foreshortened = geometry.to_homogeneous(torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.6, 0.0]]]))
        assert model.localizer._plausible(foreshortened, 64, 64).all()

    @pytest.mark.parametrize("trust_every_answer", [False, True])
    def test_an_implausible_answer_leaves_the_pair_unwarped(self, model, monkeypatch, trust_every_answer):
        truth = similarity(0.0, 0.5)  # the moving image shows the scene at twice the size
        reference = smooth_field(32, 32, seed=5)
        moving = moved(reference, truth)
        localizer = search_refine_localizer.SearchRefineLocalizer
        monkeypatch.setattr(localizer, "_estimate", lambda self, *args: truth)  # right, but beyond the searched 1/1.4
        if trust_every_answer:  # the control: without the check, the identity test alone takes the answer
            monkeypatch.setattr(localizer, "_plausible", lambda self, theta, *size: torch.ones(len(theta), dtype=bool))
        with torch.no_grad():
            theta = model.predict_theta(moving, reference)
        expected = truth if trust_every_answer else geometry.identity_theta(1)
        torch.testing.assert_close(theta, expected, rtol=0, atol=0)


def test_only_inference_holds_the_first_coarse_steps_to_shear_free_motions(monkeypatch):
    model, moving, reference, steps = record_steps(monkeypatch, inference_shear_free_steps=(3, 2, 0))
    model.eval()
    with torch.no_grad():
        model.predict_theta(moving, reference)
    assert [free for size, free in steps if size == 8] == [True] * 3 + [False]  # the selection's coarse level
    assert [free for size, free in steps if size == 16] == [True] * 2 + [False] * 4
    assert not any(free for size, free in steps if size == 32)
    steps.clear()
    model.train()
    model.predict_theta(moving, reference)
    assert steps and not any(free for _, free in steps)


class TestBothWays:
    def test_on_by_default_for_homographies_only(self):
        assert SpatialTransformer(**{**TINY_SEARCH_REFINE, "transform": "homography"}).localizer.search_both_ways
        assert not SpatialTransformer(**TINY_SEARCH_REFINE).localizer.search_both_ways
        assert SpatialTransformer(**{**TINY_SEARCH_REFINE, "search_both_ways": True}).localizer.search_both_ways

    @pytest.mark.parametrize("reverse_is_right", [True, False])
    def test_keeps_the_direction_that_fits_better(self, monkeypatch, reverse_is_right):
        model = SpatialTransformer(**{**TINY_SEARCH_REFINE, "search_both_ways": True}).eval()
        reference = smooth_field(64, 64, seed=12)
        truth = similarity(10.0, 1.1, 0.05, 0.0)
        wrong = similarity(-25.0, 0.8, -0.1, 0.1)
        # The forward estimate aligns moving onto reference; the reverse one reference onto moving.
        answers = [wrong, geometry.invert_theta(truth)] if reverse_is_right else [truth, wrong]
        calls = []
        monkeypatch.setattr(model.localizer, "_estimate", lambda *args: calls.append(args) or answers[len(calls) - 1])
        with torch.no_grad():
            theta = model.predict_theta(moved(reference, truth), reference)
        assert len(calls) == 2
        torch.testing.assert_close(calls[1][1], calls[0][0].levels[1].features)  # the reverse moves the reference
        assert error_px(theta, truth, 64, 64) < 0.01

    def test_training_and_one_way_models_estimate_once(self, monkeypatch):
        model = SpatialTransformer(**TINY_SEARCH_REFINE).eval()
        reference = smooth_field(64, 64, seed=13)
        calls = []
        real = model.localizer._estimate
        monkeypatch.setattr(model.localizer, "_estimate", lambda *args: calls.append(1) or real(*args))
        with torch.no_grad():
            model.predict_theta(moved(reference, similarity(5.0, 1.05)), reference)
        assert len(calls) == 1


class TestTraining:
    def test_gradient_reaches_every_trainable_parameter(self):
        model = SpatialTransformer(**TINY_SEARCH_REFINE)
        # At initialisation the residual branch's last layer is zero: only it gets a gradient.
        reference = smooth_field(32, 32, seed=10).repeat(2, 1, 1, 1)
        truth = torch.cat([similarity(12.0, 1.1, 0.05, 0.0), similarity(-20.0, 0.9, 0.0, 0.1)])
        moving = torch.cat([moved(reference[:1], truth[:1]), moved(reference[1:], truth[1:])])
        geometry.corner_error(model.predict_theta(moving, reference), truth, 256, 256).mean().backward()
        first, last = model.localization.residual[0], model.localization.residual[2]
        assert last.weight.grad.abs().sum() > 0 and first.weight.grad.abs().sum() == 0
        model.zero_grad()
        with torch.no_grad():
            last.weight.normal_(0, 0.1)
        geometry.corner_error(model.predict_theta(moving, reference), truth, 256, 256).mean().backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name

    def test_trains_after_inference_on_the_same_grid(self):
        # The motion basis is cached per grid; made first under inference mode, it must still train.
        gauss_newton._motion_basis.cache_clear()
        model = SpatialTransformer(**TINY_SEARCH_REFINE)
        reference = smooth_field(24, 24, seed=15)
        with torch.inference_mode():
            model.eval().predict_theta(reference, reference)
        model.train()
        theta = model.predict_theta(moved(reference, similarity(5.0, 1.0)), reference)
        theta.sum().backward()
        assert model.localization.residual[2].weight.grad is not None

    def test_log_corner_loss_bounds_a_missed_pair(self):
        model = SpatialTransformer(**TINY_SEARCH_REFINE)
        reference = smooth_field(32, 32, seed=11)
        batch = {"moving": reference, "reference": reference, "theta": similarity(90.0, 1.0)}  # far outside the search
        mean_loss, parts = training_loss(model, batch, 256, corner_loss="mean")
        log_loss, _ = training_loss(model, batch, 256, corner_loss="log")
        mean_loss, log_loss = mean_loss.detach(), log_loss.detach()
        assert float(log_loss) == pytest.approx(math.log1p(parts["corner_error"]), rel=1e-4)
        assert float(log_loss) < float(mean_loss)
        with pytest.raises(ValueError, match="corner_loss"):
            training_loss(model, batch, 256, corner_loss="median")

    def test_a_few_finetune_steps_on_a_tiny_vae_change_the_features(self, tmp_path):
        import PIL.Image
        import skimage.data

        from tests.conftest import make_tiny_vae

        photos = tmp_path / "photos"
        photos.mkdir()
        PIL.Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.jpg")
        PIL.Image.fromarray(skimage.data.coffee()).save(photos / "coffee.png")
        make_tiny_vae().save_pretrained(tmp_path / "vae")
        (tmp_path / "stn.json").write_text(json.dumps(TINY_SEARCH_REFINE))
        args = parse_args([
            "--pretrained_vae_name_or_path", str(tmp_path / "vae"), "--train_data_dir", str(photos),
            "--output_dir", str(tmp_path / "out"), "--stn_config", str(tmp_path / "stn.json"),
            "--resolution", "256", "--train_batch_size", "4", "--max_train_steps", "4", "--pairs_per_image", "2",
            "--lr_warmup_steps", "1", "--learning_rate", "1e-2", "--corner_loss", "log",
            "--validation_steps", "4", "--num_validation_pairs", "2", "--checkpointing_steps", "4",
            "--report_to", "none",
        ])  # fmt: skip
        finetune_main(args)
        trained = SpatialTransformer.from_pretrained(tmp_path / "out" / "stn")
        assert trained.config.architecture == "search_refine"
        assert trained.localization.residual[2].weight.abs().sum() > 0  # moved off its zero initialisation


def test_finetune_transform_flag_sets_the_motion_model(tmp_path):
    from stn_diffusers.finetune import build_stn
    from tests.conftest import make_tiny_vae

    vae = make_tiny_vae()
    common = ["--pretrained_vae_name_or_path", "unused", "--train_data_dir", "unused", "--output_dir", "unused"]
    built = build_stn(parse_args([*common, "--transform", "homography"]), vae)
    assert built.config.transform == "homography" and built.config.architecture == "search_refine"
    # Trained weights keep their values under another motion model.
    saved = SpatialTransformer(**TINY_SEARCH_REFINE)
    with torch.no_grad():
        saved.localization.residual[2].weight.fill_(0.25)
    saved.save_pretrained(tmp_path / "stn")
    flags = ["--pretrained_stn", str(tmp_path / "stn"), "--transform", "homography"]
    loaded = build_stn(parse_args([*common, *flags]), vae)
    assert loaded.config.transform == "homography"
    assert torch.equal(loaded.localization.residual[2].weight, saved.localization.residual[2].weight)
    with pytest.raises(SystemExit):
        parse_args([*common, "--transform", "perspective"])


def test_registration_preset_is_the_search_refine_design():
    model = SpatialTransformer(**STN_PRESETS["registration"])
    assert model.config.architecture == "search_refine" and model.supports_reference_weights
    assert sum(p.numel() for p in model.parameters()) < 1_000
