"""Alignment confidence: the evidence measures what θ leaves, the truth scores high, wrong θ and
unrelated photos score low, and bad inputs get named errors."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from stn_diffusers import geometry
from stn_diffusers.confidence import (
    DEFAULT_CONFIDENCE_THRESHOLD,
    EVIDENCE_SIZE,
    NO_EVIDENCE_RESIDUAL,
    SEARCH_RADIUS,
    alignment_confidence,
    alignment_evidence,
)
from stn_diffusers.data import seeded_pairs

SIZE = 256


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float().div(255)  # (3, H, W)


@pytest.fixture(scope="module")
def pair(photo_tensor):
    """A seeded ``standard`` pair of the astronaut, 256 × 256."""
    return seeded_pairs([photo_tensor[0]], 1, resolution=SIZE, warp="standard", seed=1)[0]


@pytest.fixture(scope="module")
def cat() -> torch.Tensor:
    """skimage's chelsea (a cat, 451 × 300): a photo unrelated to the astronaut."""
    return _tensor(skimage.data.chelsea())


def _shifted(theta: torch.Tensor, pixels: float, size: int = SIZE) -> torch.Tensor:
    """θ followed by a translation of ``pixels`` along x (mean corner error ``pixels`` at ``size``)."""
    shift = geometry.identity_theta(1)
    shift[0, 0, 2] = 2 * pixels / size
    return geometry.compose_theta(shift, theta)


class TestAlignmentEvidence:
    def test_residual_measures_a_known_shift(self, pair):
        truth = pair.theta[None]
        reach = SEARCH_RADIUS * SIZE / EVIDENCE_SIZE  # the largest shift the block search sees: 4 px at 256
        for pixels in (0.0, 1.5, 3.0):
            theta = _shifted(truth, pixels)
            assert geometry.corner_error(theta, truth, SIZE, SIZE).item() == pytest.approx(pixels, abs=1e-3)
            residual = alignment_evidence(pair.reference, pair.moving, theta).residual.item() * SIZE
            assert residual == pytest.approx(pixels, abs=0.75)
        # Beyond the search, the residual still reads at least most of the reach: an error, not a match.
        residual = alignment_evidence(pair.reference, pair.moving, _shifted(truth, 2 * reach)).residual.item() * SIZE
        assert residual > 0.75 * reach

    def test_truth_correlates_better_than_identity(self, pair):
        evidence = alignment_evidence(
            [pair.reference] * 2, [pair.moving] * 2, torch.cat([pair.theta[None], geometry.identity_theta(1)])
        )
        assert evidence.correlation[0] > 0.9 > evidence.correlation[1] + 0.3

    def test_theta_that_misses_the_reference_has_no_evidence(self, pair):
        away = geometry.identity_theta(1)
        away[0, 0, 2] = 3.0  # samples 1.5 image widths to the right: nothing of the moving image lands
        evidence = alignment_evidence(pair.reference, pair.moving, away)
        assert evidence.overlap.item() == 0.0
        assert evidence.residual.item() == NO_EVIDENCE_RESIDUAL
        assert alignment_confidence(pair.reference, pair.moving, away).item() < 0.01

    def test_ignore_mask_leaves_an_edited_region_out(self, photo_tensor):
        pair = seeded_pairs([photo_tensor[0]], 1, resolution=SIZE, warp="standard", seed=0, local_change=0.4)[0]
        edited = geometry.warp(pair.changed[None], pair.theta[None])[0]  # (1, S, S): 38 % of the reference
        thetas = torch.cat([pair.theta[None], _shifted(pair.theta[None], 8.0)])
        plain = alignment_evidence(pair.reference, [pair.moving] * 2, thetas)
        masked = alignment_evidence(pair.reference, [pair.moving] * 2, thetas, ignore_mask=edited)
        assert masked.correlation[0] > 0.9 and masked.correlation[0] > plain.correlation[0] + 0.3
        confidence = alignment_confidence(pair.reference, [pair.moving] * 2, thetas, ignore_mask=edited)
        assert confidence[0] >= DEFAULT_CONFIDENCE_THRESHOLD > confidence[1]

    def test_non_finite_theta_has_no_evidence(self, pair):
        theta = torch.full((1, 2, 3), float("nan"))
        evidence = alignment_evidence(pair.reference, pair.moving, theta)
        assert (evidence.correlation.item(), evidence.overlap.item()) == (0.0, 0.0)
        assert alignment_confidence(pair.reference, pair.moving, theta).item() < 0.01


class TestAlignmentConfidence:
    def test_truth_scores_higher_than_a_wrong_theta(self, pair):
        truth = pair.theta[None]
        thetas = torch.cat([truth, _shifted(truth, 8.0), geometry.identity_theta(1)])  # (3, 2, 3)
        confidence = alignment_confidence(pair.reference, [pair.moving] * 3, thetas)
        assert confidence[0] >= DEFAULT_CONFIDENCE_THRESHOLD
        assert confidence[0] > confidence[1] and confidence[0] > confidence[2]
        assert (confidence[1:] < DEFAULT_CONFIDENCE_THRESHOLD).all()

    def test_unrelated_photos_score_below_the_threshold(self, pair, cat):
        thetas = torch.cat([geometry.identity_theta(1), pair.theta[None]])  # (2, 2, 3)
        confidence = alignment_confidence(pair.reference, [cat, cat], thetas)
        assert (confidence < DEFAULT_CONFIDENCE_THRESHOLD).all(), confidence

    def test_photometric_change_of_the_truth_stays_above_the_threshold(self, photo_tensor):
        pairs = seeded_pairs([photo_tensor[0]], 3, resolution=SIZE, warp="standard", seed=2, photometric="realistic")
        references = torch.stack([p.reference for p in pairs])  # (3, 3, S, S)
        movings = torch.stack([p.moving for p in pairs])
        thetas = torch.stack([p.theta for p in pairs])  # (3, 2, 3)
        confidence = alignment_confidence(references, movings, thetas)
        assert (confidence >= DEFAULT_CONFIDENCE_THRESHOLD).all(), confidence

    def test_local_change_of_the_truth_stays_above_the_threshold(self, photo_tensor):
        pair = seeded_pairs([photo_tensor[0]], 1, resolution=SIZE, warp="none", seed=3, local_change=0.2)[0]
        confidence = alignment_confidence(pair.reference, pair.moving, pair.theta[None])
        assert confidence.item() >= DEFAULT_CONFIDENCE_THRESHOLD

    def test_values_in_unit_interval_with_shape_b(self, pair, cat):
        thetas = torch.cat([pair.theta[None], _shifted(pair.theta[None], 20.0), geometry.identity_theta(1)])
        confidence = alignment_confidence(pair.reference, [pair.moving, pair.moving, cat], thetas)
        assert confidence.shape == (3,)
        assert confidence.dtype == torch.float32
        assert ((confidence >= 0) & (confidence <= 1)).all()

    def test_affine_theta_and_its_homography_agree(self, pair):
        truth = pair.theta[None]
        affine = alignment_confidence(pair.reference, pair.moving, truth)
        homography = alignment_confidence(pair.reference, pair.moving, geometry.to_homogeneous(truth))
        torch.testing.assert_close(affine, homography, atol=1e-4, rtol=0)

    def test_projective_truth_scores_above_a_shifted_one(self, photo_tensor):
        pair = seeded_pairs([photo_tensor[0]], 1, resolution=SIZE, warp="projective", seed=4)[0]
        truth = pair.theta[None]  # (1, 3, 3)
        assert truth.shape == (1, 3, 3)
        confidence = alignment_confidence(pair.reference, [pair.moving] * 2, torch.cat([truth, _shifted(truth, 8.0)]))
        assert confidence[0] >= DEFAULT_CONFIDENCE_THRESHOLD > confidence[1]

    def test_any_size_non_square_and_a_moving_image_of_another_size(self, coffee):
        reference = _tensor(np.array(coffee))  # (3, 400, 600)
        moving = torch.nn.functional.interpolate(reference[None], scale_factor=0.5, mode="area")[0]  # (3, 200, 300)
        theta = geometry.identity_theta(1)
        height, width = reference.shape[-2:]
        off = _shifted(theta, 0.03 * width, size=width)  # 3 % of the side: three times the calibrated error
        confidence = alignment_confidence(reference, [moving, moving], torch.cat([theta, off]))
        assert confidence[0] >= DEFAULT_CONFIDENCE_THRESHOLD > confidence[1]

    def test_shared_reference_matches_one_call_per_pair(self, photo_tensor):
        pairs = seeded_pairs([photo_tensor[0]], 2, resolution=SIZE, warp="standard", seed=5)
        thetas = torch.stack([p.theta for p in pairs])
        batched = alignment_confidence(pairs[0].reference, [p.moving for p in pairs], thetas)
        one_by_one = torch.cat([alignment_confidence(pairs[0].reference, p.moving, p.theta[None]) for p in pairs])
        torch.testing.assert_close(batched, one_by_one)


class TestInputs:
    def test_theta_of_the_wrong_shape(self, pair):
        with pytest.raises(ValueError, match=r"expected theta of shape \(1, 2, 3\) or \(1, 3, 3\).*got \(1, 3, 2\)"):
            alignment_confidence(pair.reference, pair.moving, torch.zeros(1, 3, 2))

    def test_theta_batch_differs_from_the_moving_images(self, pair):
        expected = r"expected theta of shape \(2, 2, 3\).*one per moving image.*got \(3, 2, 3\)"
        with pytest.raises(ValueError, match=expected):
            alignment_confidence(pair.reference, [pair.moving] * 2, geometry.identity_theta(3))

    def test_theta_that_is_not_a_tensor(self, pair):
        with pytest.raises(TypeError, match="expected theta to be a torch.Tensor.*got ndarray"):
            alignment_evidence(pair.reference, pair.moving, np.eye(2, 3)[None])

    def test_references_neither_one_nor_one_per_moving_image(self, pair):
        with pytest.raises(ValueError, match=r"expected 1 reference \(shared\) or 3 \(one per moving image\), got 2"):
            alignment_confidence([pair.reference] * 2, [pair.moving] * 3, geometry.identity_theta(3))

    def test_ignore_mask_of_another_size(self, pair):
        with pytest.raises(ValueError, match=r"expected ignore_mask of size 256×256 \(its reference's\), got 128×256"):
            alignment_confidence(pair.reference, pair.moving, pair.theta[None], ignore_mask=torch.zeros(1, 256, 128))

    def test_ignore_mask_that_ignores_every_pixel(self, pair):
        with pytest.raises(ValueError, match="expected ignore_mask to leave some pixels.*ignores every pixel"):
            alignment_confidence(pair.reference, pair.moving, pair.theta[None], ignore_mask=torch.ones(1, SIZE, SIZE))

    def test_ignore_masks_neither_one_nor_one_per_moving_image(self, pair):
        masks = [torch.zeros(1, SIZE, SIZE)] * 2
        with pytest.raises(ValueError, match=r"expected 1 ignore_mask \(shared\) or 3 \(one per moving image\), got 2"):
            alignment_confidence(pair.reference, [pair.moving] * 3, geometry.identity_theta(3), ignore_mask=masks)

    def test_images_outside_the_unit_range(self, pair):
        with pytest.raises(ValueError, match=r"expected moving with float values in \[0, 1\]"):
            alignment_confidence(pair.reference, pair.moving * 255, pair.theta[None])
