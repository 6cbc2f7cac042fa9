"""ECC refinement of θ: OpenCV's convention, convergence from a coarse θ, failures kept and flagged."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from stn_diffusers import geometry
from stn_diffusers.data import seeded_pairs
from stn_diffusers.refine import refine_theta_ecc

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

    def test_one_failure_does_not_stop_the_batch(self, photo_tensor):
        pairs = _pairs(photo_tensor, warp="small", num_pairs=2)
        movings = torch.stack([pairs[0].moving, torch.full_like(pairs[1].moving, 0.5)])
        references = torch.stack([p.reference for p in pairs])
        result = refine_theta_ecc(references, movings)
        assert result.converged.tolist() == [True, False]
        assert geometry.corner_error(result.theta[:1], pairs[0].theta[None], 256, 256).item() < 0.5

    def test_bad_theta_shape_is_a_value_error(self, photo_tensor):
        with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):
            refine_theta_ecc(photo_tensor[0], photo_tensor[0], torch.eye(3)[None])

    def test_missing_opencv_names_the_extra(self, photo_tensor, monkeypatch):
        monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
        with pytest.raises(ImportError, match=r"stn-diffusers\[opencv\]"):
            refine_theta_ecc(photo_tensor[0], photo_tensor[0])


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
