"""ECC refinement of θ: OpenCV's convention, convergence from a coarse θ, failures kept and flagged."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from stn_diffusers import geometry
from stn_diffusers.data import seeded_pairs
from stn_diffusers.refine import (
    ECC_MOTIONS,
    _moving_frame_mask,
    _pixel_matrix,
    correlation,
    refine_theta_ecc,
    to_gray,
)

cv2 = pytest.importorskip("cv2", reason="OpenCV is the optional [opencv] extra")


def _pairs(photo_tensor, warp="standard", num_pairs=2, seed=0):
    return seeded_pairs([photo_tensor[0]], num_pairs, resolution=256, warp=warp, seed=seed)


class TestEccConvention:
    def test_find_transform_ecc_template_reference_returns_forward_map(self, photo_tensor):
        # M = warpAffine(R, A) (no inverse flag) shows R moved by A: ECC(template=R, input=M) returns A.
        reference = photo_tensor[0].mean(0).numpy().astype(np.float32)
        forward = np.float32([[1, 0, 6.0], [0, 1, -4.0]])
        # Reflected border: zero padding would pull the fit towards the padded edge.
        moving = cv2.warpAffine(
            reference, forward, reference.shape[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 100, 1e-6)
        start = np.eye(2, 3, dtype=np.float32)
        _, found = cv2.findTransformECC(reference, moving, start.copy(), cv2.MOTION_TRANSLATION, criteria, None, 1)
        np.testing.assert_allclose(found, forward, atol=0.1)
        _, swapped = cv2.findTransformECC(moving, reference, start.copy(), cv2.MOTION_TRANSLATION, criteria, None, 1)
        np.testing.assert_allclose(swapped[:, 2], -forward[:, 2], atol=0.1)

    def test_refined_theta_has_the_translation_as_pixel_matrix(self, photo_tensor):
        reference = photo_tensor[0]
        height, width = reference.shape[-2:]
        shift = torch.tensor([[[1.0, 0.0, 5.0], [0.0, 1.0, -3.0]]], dtype=torch.float64)
        theta_true = geometry.pixel_matrix_to_theta(shift, height, width).float()
        moving = geometry.warp(reference[None], geometry.invert_theta(theta_true), padding_mode="reflection")[0]
        result = refine_theta_ecc(reference, moving, levels=2)
        pixel = geometry.theta_to_pixel_matrix(result.theta.double(), height, width)[0]
        assert bool(result.converged[0])
        assert pixel[0, 2].item() == pytest.approx(5.0, abs=0.1)
        assert pixel[1, 2].item() == pytest.approx(-3.0, abs=0.1)


class TestRefineThetaEcc:
    def test_coarse_theta_on_a_real_photo_ends_under_half_a_pixel(self, photo_tensor):
        for pair in _pairs(photo_tensor):
            truth = pair.theta[None]
            coarse = truth.clone()
            coarse[:, :, 2] += torch.tensor([0.06, -0.05])  # ~7 px off at 256×256
            coarse[:, 0, 0] *= 1.03
            before = geometry.corner_error(coarse, truth, 256, 256).item()
            result = refine_theta_ecc(pair.reference, pair.moving, coarse)
            after = geometry.corner_error(result.theta, truth, 256, 256).item()
            assert before > 5.0
            assert bool(result.converged[0])
            assert after < 0.5, f"{before:.1f} px → {after:.2f} px"

    def test_batch_of_references_and_movings(self, photo_tensor):
        pairs = _pairs(photo_tensor, warp="small", num_pairs=3)
        references = torch.stack([p.reference for p in pairs])
        movings = torch.stack([p.moving for p in pairs])
        result = refine_theta_ecc(references, movings, levels=2)
        truth = torch.stack([p.theta for p in pairs])
        assert result.theta.shape == (3, 2, 3) and result.converged.shape == (3,)
        assert geometry.corner_error(result.theta, truth, 256, 256).max().item() < 0.5

    def test_moving_of_another_size_gives_the_same_normalised_theta(self, photo_tensor):
        pair = _pairs(photo_tensor, warp="small", num_pairs=1)[0]
        larger = torch.nn.functional.interpolate(pair.moving[None], size=(384, 384), mode="bilinear", antialias=True)[0]
        result = refine_theta_ecc(pair.reference, larger)
        assert geometry.corner_error(result.theta, pair.theta[None], 256, 256).item() < 0.5

    def test_failure_keeps_initial_theta_and_flags_it(self, photo_tensor):
        pair = _pairs(photo_tensor, num_pairs=1)[0]
        blank = torch.full_like(pair.moving, 0.5)  # no texture: ECC cannot converge
        initial = torch.tensor([[[1.0, 0.02, 0.05], [-0.01, 0.98, 0.03]]])
        result = refine_theta_ecc(pair.reference, blank, initial)
        assert not bool(result.converged[0])
        torch.testing.assert_close(result.theta, initial)

    @pytest.mark.parametrize("moved_start", [True, False])
    def test_a_coarsest_level_that_runs_off_from_a_moved_start_is_retried_without_it(
        self, photo_tensor, monkeypatch, moved_start
    ):
        from stn_diffusers import refine

        pair = _pairs(photo_tensor, num_pairs=1)[0]
        truth = pair.theta[None]
        start = truth + torch.tensor([[[0.0, 0.0, 0.03], [0.0, 0.0, -0.02]]]) if moved_start else None
        real, levels_tried = refine._ecc_one, []

        def coarsest_runs_off(reference, moving, theta, levels, *args):
            levels_tried.append(levels)
            if levels == 3:
                raise cv2.error("the coarsest level ran off")
            return real(reference, moving, theta, levels, *args)

        monkeypatch.setattr(refine, "_ecc_one", coarsest_runs_off)
        result = refine_theta_ecc(pair.reference, pair.moving, start, levels=3)
        if moved_start:
            assert levels_tried == [3, 2] and bool(result.converged[0])
            assert geometry.corner_error(result.theta, truth, 256, 256).item() < 0.5
        else:  # from the identity, no second try: the identity is kept and flagged
            assert levels_tried == [3] and not bool(result.converged[0])
            torch.testing.assert_close(result.theta, geometry.identity_theta(1))

    def test_one_failure_does_not_stop_the_batch(self, photo_tensor):
        pairs = _pairs(photo_tensor, warp="small", num_pairs=2)
        movings = torch.stack([pairs[0].moving, torch.full_like(pairs[1].moving, 0.5)])
        references = torch.stack([p.reference for p in pairs])
        result = refine_theta_ecc(references, movings)
        assert result.converged.tolist() == [True, False]
        assert geometry.corner_error(result.theta[:1], pairs[0].theta[None], 256, 256).item() < 0.5

    def test_bad_theta_shape_is_a_value_error(self, photo_tensor):
        message = r"\(1, 2, 3\) for motion='affine', got \(1, 3, 3\); pass motion='homography'"
        with pytest.raises(ValueError, match=message):
            refine_theta_ecc(photo_tensor[0], photo_tensor[0], torch.eye(3)[None])

    def test_missing_opencv_names_the_extra(self, photo_tensor, monkeypatch):
        monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
        with pytest.raises(ImportError, match=r"stn-diffusers\[opencv\]"):
            refine_theta_ecc(photo_tensor[0], photo_tensor[0])


def _coffee_pair(coffee, theta: torch.Tensor, size=(200, 300)):
    """``(reference, moving)`` ``(3, 200, 300)`` from the non-square coffee photo, ``moving`` made with
    ``warp(·, invert_theta(theta))``: both views sample the whole photo (a 0.8 zoom), so the moving
    view's border shows real content rather than padding."""
    photo = torch.from_numpy(np.array(coffee)).permute(2, 0, 1).float().div(255)[None]
    zoom = torch.tensor([[[0.8, 0.0, 0.0], [0.0, 0.8, 0.0]]])
    reference = geometry.warp(photo, zoom, size=size)[0]
    moving = geometry.warp(photo, geometry.compose_theta(zoom, geometry.invert_theta(theta)), size=size)[0]
    return reference, moving


class TestEccHomography:
    def test_find_transform_ecc_homography_returns_the_forward_map(self, photo_tensor):
        # M = warpPerspective(R, H) (no inverse flag) shows R moved by H: ECC(template=R, input=M) returns H.
        reference = cv2.resize(photo_tensor[0].mean(0).numpy(), (256, 256), interpolation=cv2.INTER_AREA)
        forward = np.float32([[1.02, 0.01, 3.0], [-0.01, 0.99, -2.0], [4e-5, -3e-5, 1.0]])
        moving = cv2.warpPerspective(
            reference, forward, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 200, 1e-7)
        start = np.eye(3, dtype=np.float32)
        _, found = cv2.findTransformECC(reference, moving, start, cv2.MOTION_HOMOGRAPHY, criteria, None, 1)
        corners = np.float32([[0, 0], [255, 0], [255, 255], [0, 255]])[None]
        np.testing.assert_allclose(
            cv2.perspectiveTransform(corners, found), cv2.perspectiveTransform(corners, forward), atol=0.1
        )

    def test_pyramid_level_pixel_matrix_is_s_h_s_inverse(self):
        # Each level's matrix comes from the one normalised θ; between levels that is P' = S P S⁻¹,
        # where S maps a pixel centre x to the half-size level's x' = s x + (s - 1) / 2.
        theta = geometry.random_theta(1, "projective", 256, 192, torch.Generator().manual_seed(0))
        fine, coarse = _pixel_matrix(theta, 256, 192), _pixel_matrix(theta, 128, 96)
        assert fine.shape == coarse.shape == (3, 3)
        s = 0.5
        scale = np.array([[s, 0, (s - 1) / 2], [0, s, (s - 1) / 2], [0, 0, 1]])
        expected = scale @ fine @ np.linalg.inv(scale)
        np.testing.assert_allclose(coarse / coarse[2, 2], expected / expected[2, 2], rtol=1e-5, atol=1e-5)
        naive = np.diag([s, s, 1.0])  # ignores where pixel centres lie: off by a fraction of a pixel
        plain = naive @ fine @ np.linalg.inv(naive)
        assert np.abs(coarse / coarse[2, 2] - plain / plain[2, 2]).max() > 1e-3

    def test_correlation_warps_a_homography_with_warp_perspective(self, photo_tensor):
        pair = _pairs(photo_tensor, warp="projective", num_pairs=1)[0]
        reference, moving = to_gray(pair.reference), to_gray(pair.moving)
        truth = pair.theta[None]  # (1, 3, 3)
        affine_part = (truth / truth[:, 2:, 2:])[:, :2]
        assert correlation(reference, moving, truth) > 0.99 > correlation(reference, moving, affine_part)
        # The affine path (warpAffine) and the projective one (warpPerspective) agree on an affine θ.
        assert correlation(reference, moving, geometry.to_homogeneous(affine_part)) == pytest.approx(
            correlation(reference, moving, affine_part), abs=1e-4
        )

    def test_homography_motion_recovers_a_projective_warp_the_affine_motion_cannot(self, photo_tensor):
        for pair in _pairs(photo_tensor, warp="projective"):
            truth = pair.theta[None]
            assert truth.shape == (1, 3, 3)
            start = geometry.corner_error(geometry.identity_theta(1), truth, 256, 256).item()
            homography = refine_theta_ecc(pair.reference, pair.moving, motion="homography")
            affine = refine_theta_ecc(pair.reference, pair.moving, motion="affine")
            assert homography.theta.shape == (1, 3, 3) and affine.theta.shape == (1, 2, 3)
            assert bool(homography.converged[0])
            error = geometry.corner_error(homography.theta, truth, 256, 256).item()
            affine_error = geometry.corner_error(affine.theta, truth, 256, 256).item()
            assert start > 20.0 and error < 0.5, f"{start:.1f} px → {error:.2f} px"
            assert affine_error > 2.0, f"the affine motion reached {affine_error:.2f} px"

    def test_slightly_off_homography_on_a_non_square_photo_ends_under_half_a_pixel(self, coffee):
        height, width = 200, 300
        truth = geometry.random_theta(1, "projective", height, width, torch.Generator().manual_seed(3))
        reference, moving = _coffee_pair(coffee, truth, (height, width))
        start = truth.clone()
        start[:, :2, 2] += torch.tensor([0.05, -0.04])  # 7.5 px and 4 px off
        start[:, 2, :2] *= 0.5  # half the perspective
        before = geometry.corner_error(start, truth, height, width).item()
        result = refine_theta_ecc(reference, moving, start, motion="homography")
        after = geometry.corner_error(result.theta, truth, height, width).item()
        assert before > 5.0 and bool(result.converged[0])
        assert after < 0.5, f"{before:.1f} px → {after:.2f} px"

    def test_affine_start_is_promoted_and_a_batch_returns_homographies(self, photo_tensor):
        pairs = _pairs(photo_tensor, warp="projective", num_pairs=2)
        truth = torch.stack([p.theta for p in pairs])  # (2, 3, 3)
        affine_part = (truth / truth[:, 2:, 2:])[:, :2]  # (2, 2, 3): a coarse estimate without perspective
        references = torch.stack([p.reference for p in pairs])
        movings = torch.stack([p.moving for p in pairs])
        result = refine_theta_ecc(references, movings, affine_part, motion="homography")
        assert result.theta.shape == (2, 3, 3) and result.converged.tolist() == [True, True]
        assert geometry.corner_error(result.theta, truth, 256, 256).max().item() < 0.5

    def test_failure_keeps_the_initial_theta_as_a_homography(self, photo_tensor):
        pair = _pairs(photo_tensor, warp="projective", num_pairs=1)[0]
        blank = torch.full_like(pair.moving, 0.5)  # no texture: ECC cannot converge
        initial = torch.tensor([[[1.0, 0.02, 0.05], [-0.01, 0.98, 0.03]]])
        result = refine_theta_ecc(pair.reference, blank, initial, motion="homography")
        assert not bool(result.converged[0])
        torch.testing.assert_close(result.theta, geometry.to_homogeneous(initial))

    def test_a_correction_beyond_max_correction_is_rejected(self, photo_tensor):
        pair = _pairs(photo_tensor, warp="projective", num_pairs=1)[0]
        result = refine_theta_ecc(pair.reference, pair.moving, motion="homography", max_correction=5.0)
        assert not bool(result.converged[0])  # the truth is > 20 px of corner motion from the identity
        torch.testing.assert_close(result.theta, torch.eye(3)[None])

    def test_unknown_motion_names_the_choices(self, photo_tensor):
        assert ECC_MOTIONS == ("affine", "homography")
        with pytest.raises(ValueError, match=r"expected motion in \('affine', 'homography'\), got 'projective'"):
            refine_theta_ecc(photo_tensor[0], photo_tensor[0], motion="projective")


def _shift(dx: float, dy: float, size: int = 256) -> torch.Tensor:
    """θ ``(1, 2, 3)`` of a shift by ``(dx, dy)`` pixels of a ``size × size`` image."""
    theta = geometry.identity_theta(1)
    theta[0, 0, 2], theta[0, 1, 2] = 2 * dx / size, 2 * dy / size
    return theta


def _pasted_pair(photo_tensor, truth: torch.Tensor, other: torch.Tensor):
    """``(reference, moving, changed)``: 256×256 views of the photo where the moving one shows the reference
    moved by ``truth``, except a pasted square (39 % of it, ``changed`` ``(1, 256, 256)`` in the moving
    frame) that moved by ``other``: an object that moved on its own, dragging a fit over every pixel."""
    reference = torch.nn.functional.interpolate(photo_tensor, size=(256, 256), mode="bilinear", antialias=True)
    moving = geometry.warp(reference, geometry.invert_theta(truth))[0]
    pasted = geometry.warp(reference, geometry.invert_theta(other))[0]
    changed = torch.zeros(1, 256, 256)
    changed[:, 40:200, 30:190] = 1
    return reference[0], moving * (1 - changed) + pasted * changed, changed


class TestReferenceMask:
    def test_masking_a_pasted_region_recovers_the_true_motion(self, photo_tensor):
        truth = _shift(5, -3)
        reference, moving, changed = _pasted_pair(photo_tensor, truth, _shift(-8, 6))
        kept = 1 - geometry.warp(changed[None], truth, mode="nearest")[0]  # the reference frame's mask
        plain = refine_theta_ecc(reference, moving)
        masked = refine_theta_ecc(reference, moving, reference_mask=kept)
        assert masked.converged.tolist() == [True]
        error = geometry.corner_error(masked.theta, truth, 256, 256).item()
        plain_error = geometry.corner_error(plain.theta, truth, 256, 256).item()
        assert error < 0.01 and plain_error > 0.2, (error, plain_error)
        assert masked.correlation.item() > 0.999 > 0.9 > plain.correlation.item()  # scored on the kept pixels

    def test_the_mask_is_read_in_the_reference_frame(self, photo_tensor):
        # A 24 px motion puts the region's place in the moving frame well off its place in the reference.
        truth = _shift(24, 0)
        reference, moving, changed = _pasted_pair(photo_tensor, truth, _shift(0, 0))
        in_reference_frame = 1 - geometry.warp(changed[None], truth, mode="nearest")[0]
        start = _shift(21, 2)
        in_moving_frame = 1 - changed  # the region taken in the wrong frame
        errors = []
        for kept in (in_reference_frame, in_moving_frame):
            result = refine_theta_ecc(reference, moving, start, reference_mask=kept)
            errors.append(geometry.corner_error(result.theta, truth, 256, 256).item())
        assert errors[0] < 0.01 and errors[1] > 0.05, errors

    def test_correlation_scores_the_kept_pixels_only(self, photo_tensor):
        truth = _shift(5, -3)
        reference, moving, changed = _pasted_pair(photo_tensor, truth, _shift(-8, 6))
        kept = (1 - geometry.warp(changed[None], truth, mode="nearest")[0, 0]).numpy().astype(np.uint8)
        ref_gray, mov_gray = to_gray(reference), to_gray(moving)
        assert correlation(ref_gray, mov_gray, truth, kept) > 0.999 > 0.9 > correlation(ref_gray, mov_gray, truth)
        assert np.isnan(correlation(ref_gray, mov_gray, truth, np.zeros_like(kept)))  # nothing kept: no evidence

    def test_a_shared_mask_batch_and_masks_of_every_form(self, photo_tensor):
        truth = _shift(5, -3)
        reference, moving, changed = _pasted_pair(photo_tensor, truth, _shift(-8, 6))
        kept = 1 - geometry.warp(changed[None], truth, mode="nearest")[0]  # (1, 256, 256)
        for mask in (kept, kept[0].numpy(), [kept], kept[None].expand(2, -1, -1, -1), kept[0] > 0.5):
            result = refine_theta_ecc([reference, reference], [moving, moving], reference_mask=mask)
            errors = geometry.corner_error(result.theta, truth.expand(2, -1, -1), 256, 256)
            assert (errors < 0.01).all(), errors

    def test_the_kept_region_is_eroded_by_the_mask_margin(self):
        kept = np.ones((64, 64), np.uint8)
        kept[20:40, 24:40] = 0
        identity = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
        for margin in (0, 2, 8):
            ignored = np.argwhere(_moving_frame_mask(kept, identity, margin) == 0)
            assert ignored.min(0).tolist() == [20 - margin, 24 - margin], margin
            assert ignored.max(0).tolist() == [39 + margin, 39 + margin], margin

    def test_bad_masks_are_named_errors(self, photo_tensor):
        image = photo_tensor[0]  # (3, 512, 512)
        with pytest.raises(
            ValueError,
            match=r"reference_mask of shape \(512, 512\) or \(1, 512, 512\) \(its "
            r"reference's size\), got \(256, 256\)",
        ):
            refine_theta_ecc(image, image, reference_mask=torch.ones(256, 256))
        with pytest.raises(ValueError, match=r"reference_mask of shape .* got \(3, 512, 512\)"):
            refine_theta_ecc(image, image, reference_mask=torch.ones(3, 512, 512))  # channels: one mask, not RGB
        with pytest.raises(ValueError, match="reference_mask to keep some pixels .* ignores them all"):
            refine_theta_ecc(image, image, reference_mask=torch.zeros(1, 512, 512))
        with pytest.raises(ValueError, match="expected 1 or 2 reference_masks"):
            refine_theta_ecc([image, image], [image, image], reference_mask=[torch.ones(512, 512)] * 3)
        for margin in (-1, 2.5, True):
            with pytest.raises(ValueError, match=r"expected mask_margin as an int >= 0 \(pixels\), got"):
                refine_theta_ecc(image, image, reference_mask=torch.ones(512, 512), mask_margin=margin)


class TestPipelineRefine:
    def test_refine_ecc_reaches_the_truth_and_flags_each_image(self, registration_pipeline, photo_tensor):
        pair = _pairs(photo_tensor, warp="small", num_pairs=1)[0]
        out = registration_pipeline(pair.moving, reference=pair.reference, output_type="pt", refine="ecc")
        plain = registration_pipeline(pair.moving, reference=pair.reference, output_type="pt")
        assert out.refined is not None and out.refined.tolist() == [True]
        assert plain.refined is None
        error = geometry.corner_error(out.theta, pair.theta[None], 256, 256).item()
        error_plain = geometry.corner_error(plain.theta, pair.theta[None], 256, 256).item()
        assert error < 0.5 < error_plain

    def test_a_refinement_the_evidence_does_not_support_is_not_accepted(
        self, registration_pipeline, astronaut, coffee, monkeypatch
    ):
        # ECC converges somewhere on unrelated photos (its own test passes): here it is made to, with a
        # shear. The confidence of what it found is low, so the STN's θ stands and refined is False.
        from stn_diffusers.pipelines import pipeline_stn_alignment
        from stn_diffusers.refine import RefinementResult

        sheared = torch.tensor([[[1.0, -0.5, 0.1], [0.2, 1.0, 0.0]]])
        monkeypatch.setattr(
            pipeline_stn_alignment, "refine_theta_ecc",
            lambda *args, **kwargs: RefinementResult(sheared, torch.tensor([True]), torch.tensor([0.9])),
        )  # fmt: skip
        unrelated, reference = coffee.resize((256, 256)), astronaut.resize((256, 256))
        out = registration_pipeline(unrelated, reference=reference, output_type="pt", refine="ecc")
        plain = registration_pipeline(unrelated, reference=reference, output_type="pt")
        assert out.refined.tolist() == [False]
        torch.testing.assert_close(out.theta, plain.theta)
        torch.testing.assert_close(out.confidence, plain.confidence)

    def test_a_supported_refinement_is_accepted_with_its_confidence(self, registration_pipeline, photo_tensor):
        pair = _pairs(photo_tensor, warp="small", num_pairs=1)[0]
        out = registration_pipeline(pair.moving, reference=pair.reference, output_type="pt", refine="ecc")
        from stn_diffusers.confidence import alignment_confidence

        assert out.refined.tolist() == [True] and out.confidence[0] > 0.5
        torch.testing.assert_close(out.confidence, alignment_confidence(pair.reference, pair.moving, out.theta))

    def test_refine_needs_images_not_only_latents(self, registration_pipeline):
        latents = torch.zeros(1, 4, 32, 32)
        with pytest.raises(ValueError, match="image and reference"):
            registration_pipeline(latents=latents, reference_latents=latents, output_type="latent", refine="ecc")

    def test_unknown_refine_is_a_value_error(self, registration_pipeline, astronaut):
        with pytest.raises(ValueError, match="'ecc'"):
            registration_pipeline(astronaut, reference=astronaut, refine="lucas-kanade")

    def test_missing_opencv_is_reported_before_encoding(self, registration_pipeline, astronaut, monkeypatch):
        monkeypatch.setitem(sys.modules, "cv2", None)
        with pytest.raises(ImportError, match=r"stn-diffusers\[opencv\]"):
            registration_pipeline(astronaut, reference=astronaut, refine="ecc")


def test_align_cli_refine_ecc_reports_the_flag(registration_pipeline, photo_tensor, tmp_path):
    from stn_diffusers.cli import main
    from stn_diffusers.images import tensor_to_pil

    pair = _pairs(photo_tensor, warp="small", num_pairs=1)[0]
    registration_pipeline.save_pretrained(tmp_path / "pipe")
    tensor_to_pil(pair.moving).save(tmp_path / "moving.png")
    tensor_to_pil(pair.reference).save(tmp_path / "reference.png")
    code = main([
        "align", "--pipeline", str(tmp_path / "pipe"), "--image", str(tmp_path / "moving.png"),
        "--reference", str(tmp_path / "reference.png"), "--output", str(tmp_path / "aligned.png"),
        "--json", str(tmp_path / "theta.json"), "--refine", "ecc",
    ])  # fmt: skip
    report = json.loads((tmp_path / "theta.json").read_text())
    theta = torch.tensor(report["theta"])[None]
    assert code == 0 and report["refined"] is True
    assert geometry.corner_error(theta, pair.theta[None], 256, 256).item() < 0.5
