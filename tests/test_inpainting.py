"""Inpainting preprocessing: aligned image and mask, exposed border, STNInpaintPipeline on tiny SD parts."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from stn_diffusers import (
    SpatialTransformer,
    STNAlignmentPipeline,
    STNInpaintPipeline,
    geometry,
    prepare_inpainting_inputs,
)
from stn_diffusers.cli import main
from stn_diffusers.inpainting import MASK_THRESHOLD, load_mask, to_mask_tensor
from stn_diffusers.pipelines.pipeline_stn_alignment import IGNORE_MASK_MARGIN

from .conftest import TINY_REGISTRATION, make_tiny_vae
from .test_images import save_sideways
from .test_pipeline import record_reference_weights

SIZE = 256


# ------------------------------------------------------------------------------------------ helpers
def rotation_shift_theta(degrees: float, shift_x: float, shift_y: float, size: int = SIZE) -> torch.Tensor:
    """θ of a rotation about the centre and a shift in pixels (square ``size × size`` frame)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    pixel = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    centre = (size - 1) / 2
    to_centre = torch.tensor([[1.0, 0, -centre], [0, 1.0, -centre], [0, 0, 1.0]], dtype=torch.float64)
    shift = torch.tensor([[1.0, 0, shift_x], [0, 1.0, shift_y], [0, 0, 1.0]], dtype=torch.float64)
    matrix = shift @ torch.linalg.inv(to_centre) @ pixel @ to_centre
    return geometry.pixel_matrix_to_theta(matrix[None], size, size).float()


def known_aligner(theta: torch.Tensor) -> STNAlignmentPipeline:
    """A real aligner whose seed STN returns ``theta`` for every input: zero weights, θ as the bias."""
    aligner = STNAlignmentPipeline(vae=make_tiny_vae(), stn=SpatialTransformer())
    with torch.no_grad():
        aligner.stn.fc_loc[2].bias.copy_(theta.reshape(6))
    aligner.set_progress_bar_config(disable=True)
    return aligner


def disk(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """Boolean ``(size, size)`` disk; ``centre = (x, y)`` in pixels (centres at integers)."""
    ys, xs = np.mgrid[0:size, 0:size]
    return (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= radius**2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def photo() -> PIL.Image.Image:
    import skimage.data

    return PIL.Image.fromarray(skimage.data.astronaut()).resize((SIZE, SIZE), PIL.Image.BICUBIC)


# ------------------------------------------------------------------------- prepare_inpainting_inputs
class TestPrepareInpaintingInputs:
    def test_mask_drawn_on_image_follows_the_warped_object(self, photo):
        theta = rotation_shift_theta(10.0, 12.0, -7.0)
        centre, radius = (150.0, 110.0), 30.0
        painted = np.asarray(photo).copy()
        painted[disk(SIZE, centre, radius)] = (255, 0, 255)  # the object: a magenta disk
        mask = PIL.Image.fromarray(disk(SIZE, centre, radius).astype(np.uint8) * 255)

        inputs = prepare_inpainting_inputs(
            known_aligner(theta), PIL.Image.fromarray(painted), mask, photo, mask_frame="image", fill_exposed=False
        )

        warped_mask = inputs.mask_image[0, 0].numpy()
        assert set(np.unique(warped_mask)) <= {0.0, 1.0}
        # Truth: the reference-frame point p with P p = centre (P: reference pixel → image pixel).
        pixel = geometry.theta_to_pixel_matrix(theta.double(), SIZE, SIZE)[0]
        truth_centre = torch.linalg.solve(pixel, torch.tensor([*centre, 1.0], dtype=torch.float64))[:2].tolist()
        truth = disk(SIZE, truth_centre, radius)
        assert iou(warped_mask > 0.5, truth) >= 0.95
        ys, xs = np.nonzero(warped_mask)
        assert abs(xs.mean() - truth_centre[0]) < 1.0 and abs(ys.mean() - truth_centre[1]) < 1.0
        # The warped object itself (magenta pixels of the aligned image) lies inside the mask.
        aligned = inputs.image[0].permute(1, 2, 0).numpy()
        magenta = (aligned[..., 0] > 0.9) & (aligned[..., 1] < 0.1) & (aligned[..., 2] > 0.9)
        assert magenta.sum() > 0.9 * truth.sum() and warped_mask[magenta].mean() == 1.0

    def test_fill_exposed_adds_exactly_the_exposed_border(self, photo):
        shift = 32  # θ samples 32 px to the right: the last 32 columns have no source pixels
        theta = torch.tensor([[[1.0, 0.0, 2 * shift / SIZE], [0.0, 1.0, 0.0]]])
        aligner = known_aligner(theta)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[100:140, 60:120] = 255
        kept = prepare_inpainting_inputs(aligner, photo, mask, photo, fill_exposed=False)
        filled = prepare_inpainting_inputs(aligner, photo, mask, photo, fill_exposed=True)

        expected_border = torch.zeros(1, 1, SIZE, SIZE)
        expected_border[..., SIZE - shift :] = 1
        torch.testing.assert_close(filled.exposed_mask, expected_border)
        torch.testing.assert_close(kept.mask_image, torch.from_numpy(mask / 255.0).float()[None, None])
        torch.testing.assert_close(filled.mask_image, torch.maximum(kept.mask_image, expected_border))
        # Image content moved by 32 px: column 100 of the aligned image shows column 132 of the photo.
        source = torch.from_numpy(np.asarray(photo) / 255.0).float().permute(2, 0, 1)
        assert (filled.image[0, :, :, 100] - source[:, :, 132]).abs().max() < 1e-4

    def test_exposed_border_of_a_rotation_is_the_invalid_area(self, photo):
        theta = rotation_shift_theta(-12.0, 5.0, 9.0)
        inputs = prepare_inpainting_inputs(known_aligner(theta), photo, np.zeros((SIZE, SIZE)), photo)
        torch.testing.assert_close(inputs.exposed_mask, 1 - geometry.valid_mask(theta, SIZE, SIZE))
        torch.testing.assert_close(inputs.mask_image, inputs.exposed_mask)
        assert 0.05 < inputs.exposed_mask.mean().item() < 0.4  # the corners of a 12° rotation

    def test_output_frame_is_the_reference_size(self, photo, coffee):
        theta = rotation_shift_theta(0.0, 0.0, 0.0)
        mask = np.zeros((100, 150), np.uint8)  # drawn at a quarter of the coffee photo's 400×600
        mask[40:60, 30:90] = 255
        aligner = known_aligner(theta)
        inputs = prepare_inpainting_inputs(aligner, coffee, mask, photo, mask_frame="image", fill_exposed=False)
        assert inputs.image.shape == (1, 3, SIZE, SIZE) and inputs.mask_image.shape == (1, 1, SIZE, SIZE)
        # Identity θ: the 600×400 image and its mask are stretched onto the 256×256 reference frame.
        mask_tensor = torch.from_numpy(mask / 255.0).float()[None, None]
        expected = F.interpolate(mask_tensor, size=(SIZE, SIZE), mode="nearest-exact")
        assert iou(inputs.mask_image.numpy() > 0.5, expected.numpy() > 0.5) >= 0.95
        reference_mask = prepare_inpainting_inputs(aligner, coffee, mask, photo, fill_exposed=False).mask_image
        assert iou(reference_mask.numpy() > 0.5, expected.numpy() > 0.5) >= 0.95

    def test_a_mask_of_another_aspect_than_its_frame_warns_once(self, photo, caplog):
        aligner = known_aligner(geometry.identity_theta(1))
        wide = np.zeros((SIZE // 2, SIZE), np.uint8)  # 2:1 against the square reference it was drawn on
        with caplog.at_level("WARNING"):
            prepare_inpainting_inputs(aligner, [photo, photo], wide, photo)
        assert caplog.text.count("differ in aspect ratio") == 1
        assert "2 of 2 mask(s)" in caplog.text and "mask 256×128, reference 256×256" in caplog.text
        assert "Crop or pad the mask" in caplog.text

        caplog.clear()
        with caplog.at_level("WARNING"):
            prepare_inpainting_inputs(aligner, photo, np.zeros((SIZE // 2, SIZE // 2), np.uint8), photo)
        assert "aspect" not in caplog.text  # a smaller mask of the same aspect is resized, not stretched


class TestMaskValidation:
    def test_grey_values_are_binarised_at_half_scale(self):
        grey = np.array([[0, 127, 128, 255]], np.uint8)
        assert to_mask_tensor(grey).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
        assert to_mask_tensor(torch.tensor([[0.49, MASK_THRESHOLD, 0.9]])).flatten().tolist() == [0.0, 1.0, 1.0]
        assert to_mask_tensor(PIL.Image.fromarray(grey)).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]

    def test_three_channels_are_converted_and_two_rejected(self):
        rgb = np.zeros((4, 4, 3), np.uint8)
        rgb[1:3, 1:3] = 255
        assert to_mask_tensor(rgb).shape == (1, 4, 4) and to_mask_tensor(rgb).sum() == 4
        assert to_mask_tensor(PIL.Image.fromarray(rgb)).sum() == 4
        with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
            to_mask_tensor(np.zeros((4, 4, 2), np.uint8))
        with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
            to_mask_tensor(torch.zeros(2, 4, 4))
        with pytest.raises(ValueError, match="mode 'LA'"):
            to_mask_tensor(PIL.Image.new("LA", (4, 4)))

    def test_values_follow_the_image_rule_for_numpy_and_torch(self):
        grey = np.array([[0, 127, 128, 255]], np.uint8)
        expected = [0.0, 0.0, 1.0, 1.0]
        assert to_mask_tensor(torch.from_numpy(grey)).flatten().tolist() == expected  # torch.uint8 is 0–255 too
        assert to_mask_tensor(grey.astype(np.uint16) * 257).flatten().tolist() == expected
        assert to_mask_tensor(torch.tensor([[False, True]])).flatten().tolist() == [0.0, 1.0]
        with pytest.raises(ValueError, match=r"found values in \[0, 255\].*divide by 255"):
            to_mask_tensor(torch.from_numpy(grey).float())
        with pytest.raises(ValueError, match="found NaN"):
            to_mask_tensor(torch.tensor([[0.0, float("nan")]]))
        # A 0/1 integer mask would be empty at full scale: refused, with the way out.
        with pytest.raises(ValueError, match=r"found values in \[0, 1\]: pass a 0/1 mask as bool"):
            to_mask_tensor(torch.tensor([[0, 1]], dtype=torch.uint8))

    def test_mask_files_and_pil_masks_are_read_upright(self, tmp_path):
        mask = np.zeros((40, 60), np.uint8)  # not symmetric: a turned mask differs in shape and content
        mask[5:15, 10:50] = 255
        path = save_sideways(PIL.Image.fromarray(mask), tmp_path / "mask.png")
        expected = torch.from_numpy(mask / 255.0).float()[None]
        torch.testing.assert_close(to_mask_tensor(load_mask(path)), expected)
        with PIL.Image.open(path) as stored:
            assert stored.size == (40, 60)  # stored sideways
            torch.testing.assert_close(to_mask_tensor(stored), expected)

    def test_mismatched_batches_and_bad_options_raise(self, photo):
        aligner = known_aligner(geometry.identity_theta(1))
        mask = np.zeros((SIZE, SIZE), np.uint8)
        with pytest.raises(ValueError, match="expected 1 or 2 mask_images"):
            prepare_inpainting_inputs(aligner, [photo, photo], [mask] * 3, photo)
        with pytest.raises(ValueError, match="expected 1 or 2 references"):
            prepare_inpainting_inputs(aligner, [photo, photo], mask, [photo] * 3)
        with pytest.raises(ValueError, match="mask_frame"):
            prepare_inpainting_inputs(aligner, photo, mask, photo, mask_frame="moving")


class TestIgnoreMask:
    # Encoded at 128×128: latents 16×16, each latent cell 16×16 pixels of the 256×256 frame.
    ALIGN = {"height": 128, "width": 128}

    @pytest.fixture
    def aligner(self) -> STNAlignmentPipeline:
        torch.manual_seed(0)
        return STNAlignmentPipeline(vae=make_tiny_vae(), stn=SpatialTransformer(**TINY_REGISTRATION))

    @staticmethod
    def quadrant_mask() -> np.ndarray:
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[: SIZE // 2, : SIZE // 2] = 255  # the top-left quarter
        return mask

    def test_by_default_a_region_drawn_on_the_reference_does_not_vote(self, aligner, photo, monkeypatch):
        calls = record_reference_weights(aligner, monkeypatch)
        prepare_inpainting_inputs(aligner, photo, self.quadrant_mask(), photo, align_kwargs=self.ALIGN)
        expected = torch.ones(1, 1, 16, 16)
        expected[..., : 8 + IGNORE_MASK_MARGIN, : 8 + IGNORE_MASK_MARGIN] = 0  # the repainted quarter, widened
        torch.testing.assert_close(calls[0], expected, rtol=0, atol=0)

    def test_the_default_ignores_nothing_where_it_cannot_apply(self, aligner, photo, monkeypatch):
        calls = record_reference_weights(aligner, monkeypatch)
        mask = self.quadrant_mask()
        prepare_inpainting_inputs(aligner, photo, mask, photo, mask_frame="image", align_kwargs=self.ALIGN)
        prepare_inpainting_inputs(aligner, photo, mask, photo, ignore_mask=False, align_kwargs=self.ALIGN)
        everything = np.full((SIZE, SIZE), 255, np.uint8)  # a full repaint leaves nothing to align on
        prepare_inpainting_inputs(aligner, photo, everything, photo, align_kwargs=self.ALIGN)
        assert calls == [None, None, None]  # (a seed STN, which cannot weight cells, is the tests above)

    def test_an_explicit_mask_replaces_the_default(self, aligner, photo, monkeypatch):
        calls = record_reference_weights(aligner, monkeypatch)
        ignore = np.zeros((SIZE, SIZE), np.uint8)
        ignore[:, SIZE // 2 :] = 255  # the right half, not the repainted quarter
        prepare_inpainting_inputs(
            aligner, photo, self.quadrant_mask(), photo, mask_frame="image", ignore_mask=ignore, align_kwargs=self.ALIGN
        )
        expected = torch.ones(1, 1, 16, 16)
        expected[..., 8 - IGNORE_MASK_MARGIN :] = 0  # the right half, widened
        torch.testing.assert_close(calls[0], expected, rtol=0, atol=0)

    def test_bad_ignore_masks_are_named_errors(self, aligner, photo):
        mask = self.quadrant_mask()
        with pytest.raises(ValueError, match="ignore_mask as None .* got True"):
            prepare_inpainting_inputs(aligner, photo, mask, photo, ignore_mask=True)
        with pytest.raises(ValueError, match="passed to prepare_inpainting_inputs itself, got it in align_kwargs"):
            prepare_inpainting_inputs(aligner, photo, mask, photo, align_kwargs={"ignore_mask": mask})
        with pytest.raises(ValueError, match=r"ignore_mask of size 256×256 \(its reference's size"):
            prepare_inpainting_inputs(aligner, photo, mask, photo, ignore_mask=np.zeros((128, 128), np.uint8))
        with pytest.raises(ValueError, match="ignore_mask=None for an stn with architecture='seed'"):
            prepare_inpainting_inputs(known_aligner(geometry.identity_theta(1)), photo, mask, photo, ignore_mask=mask)


# ------------------------------------------------------------------------------- STNInpaintPipeline
@pytest.fixture(scope="module")
def inpaint_pipe() -> StableDiffusionInpaintPipeline:
    """StableDiffusionInpaintPipeline from tiny, randomly initialised parts; no tokenizer (prompt_embeds)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=9, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
                       num_attention_heads=4, num_hidden_layers=2, vocab_size=1000)
    )  # fmt: skip
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    return StableDiffusionInpaintPipeline(
        vae=make_tiny_vae(), text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def embeds(inpaint_pipe) -> dict:
    """Prompt embeddings from the tiny text encoder on fixed token ids (no tokenizer download)."""
    with torch.no_grad():
        prompt = inpaint_pipe.text_encoder(torch.arange(1, 78)[None])[0]
        negative = inpaint_pipe.text_encoder(torch.ones(1, 77, dtype=torch.long))[0]
    return {"prompt_embeds": prompt, "negative_prompt_embeds": negative}


def stn_with_theta(theta: torch.Tensor) -> SpatialTransformer:
    stn = SpatialTransformer()
    with torch.no_grad():
        stn.fc_loc[2].bias.copy_(theta.reshape(6))
    return stn


class TestSTNInpaintPipeline:
    def test_runs_offline_shares_the_vae_and_round_trips(self, inpaint_pipe, embeds, photo, tmp_path):
        pipe = STNInpaintPipeline.from_pipe(inpaint_pipe, stn=stn_with_theta(rotation_shift_theta(5.0, 8.0, 0.0)))
        pipe.set_progress_bar_config(disable=True)
        assert pipe.vae is inpaint_pipe.vae and pipe.unet is inpaint_pipe.unet
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[80:160, 90:170] = 255
        call = dict(
            image=photo, mask_image=mask, reference_image=photo, num_inference_steps=2, output_type="np", **embeds
        )

        out = pipe(generator=torch.Generator().manual_seed(0), **call)
        assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()
        torch.testing.assert_close(out.theta, rotation_shift_theta(5.0, 8.0, 0.0))
        assert set(out.mask_image.unique().tolist()) == {0.0, 1.0} and out.exposed_mask.sum() > 0

        pipe.save_pretrained(tmp_path / "stn-inpaint")
        loaded = STNInpaintPipeline.from_pretrained(tmp_path / "stn-inpaint")
        loaded.set_progress_bar_config(disable=True)
        assert loaded.tokenizer is None and torch.equal(loaded.stn.fc_loc[2].bias, pipe.stn.fc_loc[2].bias)
        again = loaded(generator=torch.Generator().manual_seed(0), **call)
        np.testing.assert_allclose(again.images, out.images, atol=1e-5)
        torch.testing.assert_close(again.theta, out.theta)

    def test_warp_back_restores_the_original_frame(self, inpaint_pipe, embeds, photo):
        theta = rotation_shift_theta(8.0, 10.0, -6.0)
        pipe = STNInpaintPipeline.from_pipe(inpaint_pipe, stn=stn_with_theta(theta))
        pipe.set_progress_bar_config(disable=True)
        mask = disk(SIZE, (120.0, 130.0), 25.0)
        call = dict(image=photo, mask_image=mask.astype(np.uint8) * 255, reference_image=photo, mask_frame="image",
                    overlay_unmasked=True, num_inference_steps=2, output_type="np", **embeds)  # fmt: skip

        back = pipe(warp_back=True, generator=torch.Generator().manual_seed(0), **call)
        aligned = prepare_inpainting_inputs(pipe.aligner, photo, call["mask_image"], photo).image[0]
        aligned = aligned.permute(1, 2, 0).numpy()

        original = np.asarray(photo, dtype=np.float32) / 255
        # Un-masked interior: away from the mask and from the area the reference frame does not reach.
        margin = 4
        grown = F.max_pool2d(torch.from_numpy(mask).float()[None, None], 2 * margin + 1, 1, margin)
        near_mask = grown[0, 0].numpy() > 0
        covered = geometry.valid_mask(geometry.invert_theta(theta), SIZE, SIZE)
        covered = -F.max_pool2d(-covered, 2 * margin + 1, 1, margin)[0, 0].numpy() > 0.5
        interior = covered & ~near_mask
        assert interior.mean() > 0.5
        assert psnr(back.images[0][interior], original[interior]) >= 30.0
        assert psnr(aligned[interior], original[interior]) < 20.0  # the aligned frame is not the original
        # The masked area was repainted, not copied back.
        assert np.abs(back.images[0][mask] - original[mask]).mean() > 0.05

    def test_rejects_a_two_channel_mask_before_inpainting(self, inpaint_pipe, embeds, photo):
        pipe = STNInpaintPipeline.from_pipe(inpaint_pipe, stn=SpatialTransformer())
        with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
            pipe(image=photo, mask_image=np.zeros((SIZE, SIZE, 2), np.uint8), reference_image=photo, **embeds)
        with pytest.raises(ValueError, match="output_type"):
            pipe(image=photo, mask_image=np.zeros((SIZE, SIZE)), reference_image=photo, output_type="latent", **embeds)
        inputs = dict(image=photo, mask_image=np.zeros((SIZE, SIZE)), reference_image=photo, **embeds)
        with pytest.raises(ValueError, match="expected no 'masked_image_latents'"):
            pipe(masked_image_latents=torch.zeros(1, 4, 32, 32), **inputs)


# ------------------------------------------------------------------------------------ command line
def test_cli_align_writes_the_aligned_image_and_mask(photo, tmp_path):
    shift = 16
    theta = torch.tensor([[[1.0, 0.0, 2 * shift / SIZE], [0.0, 1.0, 0.0]]])
    known_aligner(theta).save_pretrained(tmp_path / "aligner")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[50:90, 100:140] = 255
    photo.save(tmp_path / "image.png")
    photo.save(tmp_path / "reference.png")
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")

    code = main([
        "align", "--pipeline", str(tmp_path / "aligner"), "--image", str(tmp_path / "image.png"),
        "--reference", str(tmp_path / "reference.png"), "--mask", str(tmp_path / "mask.png"), "--mask-frame", "image",
        "--output", str(tmp_path / "aligned.png"), "--output-mask", str(tmp_path / "aligned_mask.png"),
    ])  # fmt: skip

    assert code == 0
    written = np.asarray(PIL.Image.open(tmp_path / "aligned_mask.png"))
    assert set(np.unique(written)) == {0, 255}
    expected = np.zeros_like(mask)
    expected[50:90, 100 - shift : 140 - shift] = 255  # the mask moved with the image
    expected[:, SIZE - shift :] = 255  # and the exposed border is to be filled
    np.testing.assert_array_equal(written, expected)
    assert PIL.Image.open(tmp_path / "aligned.png").size == (SIZE, SIZE)
    no_reference = ["align", "--pipeline", str(tmp_path / "aligner"), "--image", str(tmp_path / "image.png"),
                    "--mask", str(tmp_path / "mask.png"), "--output", str(tmp_path / "x.png")]  # fmt: skip
    assert main(no_reference) == 2 and not (tmp_path / "x.png").exists()
