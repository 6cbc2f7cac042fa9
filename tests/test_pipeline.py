import dataclasses

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DiffusionPipeline

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline, STNAlignmentPipelineOutput, confidence, geometry
from stn_diffusers.images import to_rgb_list
from stn_diffusers.pipelines.pipeline_stn_alignment import IGNORE_MASK_MARGIN

from .conftest import TINY_REGISTRATION, make_tiny_vae


def odd_photo(coffee: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """A 1000×750 photo in the given PIL mode."""
    return coffee.resize((1000, 750), PIL.Image.BICUBIC).convert(mode)


class TestOutputs:
    def test_seed_pipeline_on_a_photo_returns_all_four_outputs(self, seed_pipeline, astronaut):
        out = seed_pipeline(astronaut)
        assert isinstance(out, STNAlignmentPipelineOutput)
        assert len(out.images) == 1 and out.images[0].size == (512, 512)
        assert out.warped_images[0].size == astronaut.size
        assert out.theta.shape == (1, 2, 3)
        assert out.latents.shape == (1, 4, 64, 64)
        # An untrained seed STN is the identity: the pixel warp gives the photo back.
        difference = np.abs(np.asarray(out.warped_images[0], dtype=np.int16) - np.asarray(astronaut, dtype=np.int16))
        assert difference.max() <= 1

    @pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
    def test_odd_sizes_and_modes(self, registration_pipeline, coffee, mode):
        image = odd_photo(coffee, mode)
        reference = coffee.convert(mode)  # 600×400
        out = registration_pipeline(image, reference=reference, output_type="np")
        # Working size follows the reference's aspect with the longer side 512: 512×336 (rounded to 8).
        assert out.images.shape == (1, 336, 512, 3)
        assert out.warped_images.shape == (1, 750, 1000, 3)
        assert out.latents.shape == (1, 4, 42, 64)
        assert 0 <= out.images.min() and out.images.max() <= 1

    def test_working_size_override_and_rounding(self, registration_pipeline, coffee):
        out = registration_pipeline(coffee, reference=coffee, height=128, width=192, output_type="pt")
        assert out.images.shape == (1, 3, 128, 192)
        assert out.warped_images.shape == (1, 3, 400, 600)
        with pytest.raises(ValueError, match="multiples of 8"):
            registration_pipeline(coffee, reference=coffee, height=130, width=192)

    def test_batches_lists_and_mixed_sizes(self, registration_pipeline, astronaut, coffee):
        out = registration_pipeline([astronaut, coffee, np.asarray(astronaut)], reference=astronaut, batch_size=2)
        assert out.theta.shape == (3, 2, 3)
        assert [im.size for im in out.warped_images] == [(512, 512), (600, 400), (512, 512)]
        out = registration_pipeline([astronaut, coffee], reference=astronaut, output_type="pt")
        assert isinstance(out.warped_images, list) and out.warped_images[1].shape == (3, 400, 600)

    def test_latents_skip_the_encoder(self, registration_pipeline, astronaut):
        first = registration_pipeline(astronaut, reference=astronaut, output_type="latent")
        assert first.images is None
        encoded = registration_pipeline.encode(
            registration_pipeline.image_processor.preprocess(astronaut, height=512, width=512)
        )
        second = registration_pipeline(latents=encoded, reference_latents=encoded, output_type="pt")
        torch.testing.assert_close(second.theta, first.theta)
        assert second.images.shape == (1, 3, 512, 512) and second.warped_images is None

    def test_pixel_warp_uses_theta_at_full_resolution(self, seed_pipeline, astronaut):
        # Force a known transform through the seed head's bias: θ is a 32-px shift at 512 px.
        with torch.no_grad():
            seed_pipeline.stn.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, 2 * 32 / 512, 0, 1.0, 0]))
        big = astronaut.resize((1024, 1024), PIL.Image.BICUBIC)
        out = seed_pipeline(big, output_type="np")
        expected = (
            geometry.warp(
                torch.from_numpy(np.asarray(big, dtype=np.float32) / 255).permute(2, 0, 1)[None],
                out.theta,
                mode="bicubic",
            )[0]
            .permute(1, 2, 0)
            .numpy()
            .clip(0, 1)
        )
        assert np.abs(out.warped_images[0] - expected).max() < 1e-4
        # 32 px at 512 is 64 px at 1024: column 100 of the output shows column 164 of the input.
        assert np.abs(out.warped_images[0][:, 100] - np.asarray(big)[:, 164] / 255).mean() < 0.01
        assert out.displacement[0].item() == pytest.approx(64.0, abs=1e-3)

    def test_min_displacement_returns_input_unwarped(self, seed_pipeline, astronaut):
        with torch.no_grad():
            seed_pipeline.stn.fc_loc[2].bias.copy_(torch.tensor([1.0, 0, 2 * 0.5 / 512, 0, 1.0, 0]))
        out = seed_pipeline(astronaut, min_displacement=1.0, output_type="np")
        assert out.unwarped.tolist() == [True]
        torch.testing.assert_close(out.theta, geometry.identity_theta(1))
        assert np.abs(out.warped_images[0] - np.asarray(astronaut) / 255).max() < 1e-6
        assert seed_pipeline(astronaut, min_displacement=0.1).unwarped.tolist() == [False]

    def test_an_exact_identity_is_unwarped_at_the_default_min_displacement(self, seed_pipeline, astronaut):
        # The seed design starts at the identity: at min_displacement=0 the input comes back untouched.
        out = seed_pipeline(astronaut, output_type="np")
        assert out.displacement.tolist() == [0.0] and out.unwarped.tolist() == [True]
        assert np.array_equal(out.warped_images[0], np.asarray(astronaut, dtype=np.float32) / 255)

    def test_tuple_output_holds_every_field_in_dataclass_order(self, seed_pipeline, astronaut):
        as_tuple = seed_pipeline(astronaut, min_displacement=1.0, output_type="pt", return_dict=False)
        images, warped_images, theta, latents, displacement, unwarped, refined, confidence = as_tuple
        assert len(images) == 1 and theta.shape == (1, 2, 3) and latents.shape == (1, 4, 64, 64)
        assert displacement.shape == (1,) and unwarped.tolist() == [True] and refined is None
        assert confidence is None  # no reference to judge the alignment against
        as_dict = seed_pipeline(astronaut, min_displacement=1.0, output_type="pt")
        for field, value in zip(dataclasses.fields(STNAlignmentPipelineOutput), as_tuple, strict=True):
            expected = getattr(as_dict, field.name)
            assert (value is None) == (expected is None), field.name
            if value is not None:
                torch.testing.assert_close(value, expected, msg=field.name)

    def test_confidence_judges_the_returned_theta_on_the_pixels(self, registration_pipeline, astronaut, coffee):
        # The untrained STN starts at the identity: right for a photo against itself, wrong for another photo.
        same = registration_pipeline(astronaut, reference=astronaut, output_type="latent")
        other = registration_pipeline(coffee.resize((512, 512)), reference=astronaut, output_type="latent")
        assert same.confidence.shape == (1,) and 0.5 <= same.confidence.item() <= 1.0
        assert 0.0 <= other.confidence.item() < 0.5
        latents_only = registration_pipeline(latents=same.latents, reference_latents=same.latents)
        assert latents_only.confidence is None

    def test_one_progress_bar_covers_every_chunk_of_a_batch(self, registration_pipeline, coffee, monkeypatch):
        pipe = registration_pipeline
        calls = []

        def counted(function):
            def call(*args, **kwargs):
                calls.append(function.__name__)
                return function(*args, **kwargs)

            return call

        for module, name in ((pipe.vae, "encode"), (pipe.stn, "predict_theta"), (pipe.vae, "decode")):
            monkeypatch.setattr(module, name, counted(getattr(module, name)))
        bars, make_bar = [], pipe.progress_bar
        monkeypatch.setattr(pipe, "progress_bar", lambda **kwargs: bars.append(make_bar(**kwargs)) or bars[-1])

        pipe([coffee] * 3, reference=coffee, batch_size=2, height=128, width=192, output_type="pt")

        # 2 encodes (3 images and the shared reference, 2 pairs' worth each), 2 chunks aligned, 2 decoded.
        assert calls.count("encode") == 2 and calls.count("predict_theta") == 2 and calls.count("decode") == 2
        assert len(bars) == 1 and bars[0].total == bars[0].n == len(calls)

    def test_autoencoder_tiny(self, astronaut):
        torch.manual_seed(0)
        vae = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
        )  # fmt: skip
        pipe = STNAlignmentPipeline(vae=vae, stn=SpatialTransformer(**TINY_REGISTRATION))
        out = pipe(astronaut, reference=astronaut, output_type="pt")
        assert out.latents.shape == (1, 4, 64, 64) and out.images.shape == (1, 3, 512, 512)

    def test_sd_sized_vae_once(self, coffee):
        torch.manual_seed(0)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, scaling_factor=0.18215,
        ).eval()  # fmt: skip
        pipe = STNAlignmentPipeline(vae=vae, stn=SpatialTransformer(**TINY_REGISTRATION))
        out = pipe(coffee, reference=coffee, height=128, width=192, output_type="pt")
        assert out.images.shape == (1, 3, 128, 192) and out.latents.shape == (1, 4, 16, 24)


def count_encoded_batches(pipe: STNAlignmentPipeline, monkeypatch) -> list[int]:
    """The batch size of every call to ``pipe.vae.encode`` from now on, as a list that fills in."""
    sizes, encode = [], pipe.vae.encode

    def counted(images, *args, **kwargs):
        sizes.append(len(images))
        return encode(images, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", counted)
    return sizes


def forbid_decoding(pipe: STNAlignmentPipeline, monkeypatch) -> None:
    def decode(*args, **kwargs):
        raise AssertionError("the VAE decoder ran")

    monkeypatch.setattr(pipe.vae, "decode", decode)


class TestNoWaste:
    def test_latent_output_never_runs_the_decoder(self, registration_pipeline, coffee, monkeypatch):
        forbid_decoding(registration_pipeline, monkeypatch)
        out = registration_pipeline(coffee, reference=coffee, height=128, width=192, output_type="latent")
        assert out.images is None and out.warped_images is None and out.latents.shape == (1, 4, 16, 24)

    def test_decode_false_returns_the_pixel_warp_without_decoding(self, registration_pipeline, coffee, monkeypatch):
        call = dict(reference=coffee, height=128, width=192, output_type="np")
        decoded = registration_pipeline(coffee, **call)
        forbid_decoding(registration_pipeline, monkeypatch)
        warped_only = registration_pipeline(coffee, decode=False, **call)
        assert warped_only.images is None and warped_only.warped_images.shape == (1, 400, 600, 3)
        np.testing.assert_array_equal(warped_only.warped_images, decoded.warped_images)
        with pytest.raises(TypeError, match="decode to be True or False"):
            registration_pipeline(coffee, decode="no", **call)

    def test_image_and_reference_are_encoded_in_one_batch(self, registration_pipeline, coffee, monkeypatch):
        pipe, call = registration_pipeline, dict(height=128, width=192, output_type="latent")
        sizes = count_encoded_batches(pipe, monkeypatch)
        together = pipe(coffee, reference=coffee.rotate(3), **call)
        assert sizes == [2]
        # Encoding the two apart gives the same θ: batching changes the cost, not the answer.
        apart = [pipe.encode_images([image], 128, 192) for image in to_rgb_list([coffee, coffee.rotate(3)])]
        torch.testing.assert_close(together.theta, pipe.predict_theta(*apart))

        sizes.clear()
        pipe([coffee] * 3, reference=[coffee] * 3, batch_size=2, **call)  # 2 pairs' worth: 4 inputs, then 2
        assert sizes == [4, 2]
        sizes.clear()
        pipe(latents=together.latents, reference=coffee, **call)  # only the reference is left to encode
        assert sizes == [1]

    def test_each_input_is_resized_once_from_its_own_size(self, registration_pipeline, coffee, astronaut, monkeypatch):
        resizes, interpolate = [], torch.nn.functional.interpolate

        def recorded(image, size=None, **kwargs):
            # The confidence check judges the result on its own small copies (longer side EVIDENCE_SIZE).
            if max(size) != confidence.EVIDENCE_SIZE:
                resizes.append((tuple(image.shape[-2:]), tuple(size)))
            return interpolate(image, size=size, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "interpolate", recorded)
        registration_pipeline(odd_photo(coffee, "RGB"), reference=coffee, output_type="latent")
        # File size straight to the working size (512×336), once per input; nothing resizes again.
        assert sorted(resizes) == [((400, 600), (336, 512)), ((750, 1000), (336, 512))]
        resizes.clear()
        registration_pipeline(astronaut, reference=astronaut, output_type="latent")
        assert resizes == []  # already at the working size

    def test_outputs_are_inference_tensors_that_clone_into_autograd(self, registration_pipeline, coffee):
        out = registration_pipeline(coffee, reference=coffee, height=128, width=192, output_type="latent")
        assert torch.is_inference(out.theta) and torch.is_inference(out.latents)
        latents = out.latents.clone().requires_grad_()
        (latents * 2).sum().backward()
        assert torch.equal(latents.grad, torch.full_like(latents, 2.0))

    def test_homography_stn_holds_small_motions_as_the_3x3_identity(self, coffee):
        stn = SpatialTransformer(**{**TINY_REGISTRATION, "transform": "homography"})
        pipe = STNAlignmentPipeline(vae=make_tiny_vae(), stn=stn)
        out = pipe(coffee, reference=coffee, height=128, width=192, output_type="pt", min_displacement=1e9)
        assert out.unwarped.tolist() == [True]
        torch.testing.assert_close(out.theta, torch.eye(3)[None])
        torch.testing.assert_close(out.warped_images[0], to_rgb_list(coffee)[0], rtol=0, atol=0)

    def test_ecc_refines_a_homography_stn_in_its_own_motion_model(self, coffee):
        stn = SpatialTransformer(**{**TINY_REGISTRATION, "transform": "homography"})
        pipe = STNAlignmentPipeline(vae=make_tiny_vae(), stn=stn)
        out = pipe(coffee, reference=coffee, height=128, width=192, output_type="latent", refine="ecc")
        assert out.theta.shape == (1, 3, 3) and out.refined is not None
        with pytest.raises(ValueError, match="motion='homography'"):  # an explicit choice still wins
            pipe(coffee, reference=coffee, height=128, width=192, output_type="latent", refine="ecc",
                 refine_kwargs={"motion": "affine"})  # fmt: skip


class TestValidation:
    def test_missing_reference(self, registration_pipeline, astronaut):
        with pytest.raises(ValueError, match="expected a reference"):
            registration_pipeline(astronaut)

    def test_mismatched_batch_sizes(self, registration_pipeline, astronaut):
        with pytest.raises(ValueError, match="expected 1 or 2 references"):
            registration_pipeline([astronaut, astronaut], reference=[astronaut] * 3)
        latents = torch.zeros(2, 4, 64, 64)
        with pytest.raises(ValueError, match=r"reference_latents of shape \(2, 4, 64, 64\)"):
            registration_pipeline(latents=latents, reference_latents=torch.zeros(3, 4, 64, 64))
        with pytest.raises(ValueError, match=r"expected latents of shape \(B, 4, h, w\), got \(2, 3, 64, 64\)"):
            registration_pipeline(latents=torch.zeros(2, 3, 64, 64), reference_latents=latents)

    def test_bad_image_inputs(self, registration_pipeline, astronaut):
        with pytest.raises(ValueError, match="1, 3 or 4 channels"):
            registration_pipeline(np.zeros((64, 64, 2), dtype=np.uint8), reference=astronaut)
        with pytest.raises(TypeError, match="PIL.Image, numpy array or torch.Tensor"):
            registration_pipeline("not-an-image", reference=astronaut)
        with pytest.raises(ValueError, match="got neither"):
            registration_pipeline(reference=astronaut)
        with pytest.raises(ValueError, match="output_type in"):
            registration_pipeline(astronaut, reference=astronaut, output_type="jpeg")

    def test_stn_must_match_the_vae_channels(self, tiny_vae):
        with pytest.raises(ValueError, match="in_channels=4"):
            STNAlignmentPipeline(vae=tiny_vae, stn=SpatialTransformer(in_channels=8))


def left_columns_mask(height: int, width: int, columns: int) -> np.ndarray:
    """A uint8 ignore mask ``(height, width)``: white (ignore) on the first ``columns`` columns."""
    mask = np.zeros((height, width), np.uint8)
    mask[:, :columns] = 255
    return mask


def record_reference_weights(pipe: STNAlignmentPipeline, monkeypatch) -> list:
    """The ``reference_weights`` of every call to ``pipe.stn.predict_theta``, as they come."""
    calls, predict_theta = [], pipe.stn.predict_theta

    def spy(sample, reference=None, return_intermediate=False, *, reference_weights=None):
        calls.append(reference_weights)
        return predict_theta(sample, reference, return_intermediate, reference_weights=reference_weights)

    monkeypatch.setattr(pipe.stn, "predict_theta", spy)
    return calls


class TestIgnoreMask:
    # 256×128 images encoded at their own size: latents 32×16, each latent cell 8×8 pixels.
    SIZE = (256, 128)
    WORK = {"height": 128, "width": 256, "output_type": "latent"}

    def test_the_stn_weights_each_latent_cell_by_its_kept_share(self, registration_pipeline, astronaut, monkeypatch):
        image = astronaut.resize(self.SIZE)
        calls = record_reference_weights(registration_pipeline, monkeypatch)
        # 44 columns ignored: latent columns 0-4 entirely (0 weight), column 5 half (0.5), the rest kept;
        # then widened by IGNORE_MASK_MARGIN (3) cells: columns 0-7 at 0, column 8 at 0.5.
        assert IGNORE_MASK_MARGIN == 3
        mask = left_columns_mask(128, 256, 44)
        registration_pipeline([image, image], reference=image, ignore_mask=mask, **self.WORK)
        (weights,) = calls
        assert weights.shape == (2, 1, 16, 32)
        expected = torch.ones(16, 32)
        expected[:, :8], expected[:, 8] = 0.0, 0.5
        for i in range(2):  # one mask shared by both images
            torch.testing.assert_close(weights[i, 0], expected, rtol=0, atol=0)

    def test_a_mask_leaving_a_sliver_is_not_widened_over_it(self, registration_pipeline, astronaut, monkeypatch):
        image = astronaut.resize(self.SIZE)
        calls = record_reference_weights(registration_pipeline, monkeypatch)
        # 232 of 256 columns ignored: the 3 kept latent columns would all fall within the margin.
        registration_pipeline(image, reference=image, ignore_mask=left_columns_mask(128, 256, 232), **self.WORK)
        (weights,) = calls
        assert weights[0, 0, :, :29].max() == 0 and weights[0, 0, :, 29:].min() == 1

    def test_one_mask_per_image_and_no_mask_means_no_weights(self, registration_pipeline, astronaut, monkeypatch):
        image = astronaut.resize(self.SIZE)
        calls = record_reference_weights(registration_pipeline, monkeypatch)
        masks = [left_columns_mask(128, 256, 128), np.zeros((128, 256), np.uint8)]
        registration_pipeline([image, image], reference=image, ignore_mask=masks, **self.WORK)
        registration_pipeline(image, reference=image, **self.WORK)
        # Half the columns ignored, widened by the margin: latent columns 0-18 at 0.
        assert calls[0][0, 0, :, :19].max() == 0 and calls[0][0, 0, :, 19:].min() == 1 and calls[0][1].min() == 1
        assert calls[1] is None

    def test_a_mask_that_ignores_nothing_changes_nothing_and_one_that_ignores_half_does(
        self, registration_pipeline, astronaut, coffee
    ):
        with torch.no_grad():
            registration_pipeline.stn.residual_gate.fill_(0.5)  # open: the fitted matches reach θ
        image, reference = coffee.resize(self.SIZE), astronaut.resize(self.SIZE)
        plain = registration_pipeline(image, reference=reference, **self.WORK).theta
        nothing = registration_pipeline(
            image, reference=reference, ignore_mask=np.zeros((128, 256), np.uint8), **self.WORK
        ).theta
        half = registration_pipeline(
            image, reference=reference, ignore_mask=left_columns_mask(128, 256, 128), **self.WORK
        ).theta
        assert torch.equal(plain, nothing) and not torch.allclose(plain, half)

    def test_ecc_is_given_the_kept_pixels_of_each_reference(self, registration_pipeline, astronaut, monkeypatch):
        pytest.importorskip("cv2", reason="OpenCV is the optional [opencv] extra")
        from stn_diffusers.pipelines import pipeline_stn_alignment

        image = astronaut.resize(self.SIZE)
        given, refine = {}, pipeline_stn_alignment.refine_theta_ecc

        def spy(*args, **kwargs):
            given.update(kwargs)
            return refine(*args, **kwargs)

        monkeypatch.setattr(pipeline_stn_alignment, "refine_theta_ecc", spy)
        mask = left_columns_mask(128, 256, 42)
        registration_pipeline(image, reference=image, refine="ecc", ignore_mask=mask, **self.WORK)
        (kept,) = given["reference_mask"]
        torch.testing.assert_close(kept, torch.from_numpy(mask < 128).float()[None])  # 1 = use: the unmasked pixels

    def test_bad_masks_are_named_errors_before_any_encode(self, registration_pipeline, astronaut, monkeypatch):
        image = astronaut.resize(self.SIZE)
        monkeypatch.setattr(registration_pipeline, "encode", None)  # a check that came too late would call it
        cases = [
            (np.zeros((128, 128), np.uint8), r"ignore_mask of size 256×128 \(its reference's size.*got 128×128"),
            (np.zeros((128, 256, 2), np.uint8), r"expected ignore_mask with 1 \(grey\) or 3 .* got 2"),
            (np.zeros((128, 256, 4), np.uint8), r"expected ignore_mask with 1 \(grey\) or 3 .* got 4"),
            (np.full((128, 256), 255, np.uint8), "expected ignore_mask to leave some pixels .* ignores every pixel"),
            ([np.zeros((128, 256), np.uint8)] * 3, "expected 1 or 2 ignore_masks"),
            (np.ones((128, 256), np.uint8), r"found values in \[0, 1\]: pass a 0/1 mask as bool"),
        ]
        for mask, message in cases:
            with pytest.raises(ValueError, match=message):
                registration_pipeline([image, image], reference=image, ignore_mask=mask)
        latents = torch.zeros(1, 4, 16, 32)
        with pytest.raises(ValueError, match=r"ignore_mask of size 256×128 \(the working size of reference_latents\)"):
            registration_pipeline(latents=latents, reference_latents=latents, ignore_mask=np.zeros((64, 128), bool))

    def test_the_seed_design_refuses_a_mask_it_cannot_use(self, seed_pipeline, astronaut):
        with pytest.raises(ValueError, match="ignore_mask=None for an stn with architecture='seed'.*'correlation' can"):
            seed_pipeline(astronaut, ignore_mask=np.zeros((512, 512), np.uint8))


class TestSizeWarnings:
    def test_an_aspect_mismatch_warns_once_and_says_what_to_do(self, registration_pipeline, coffee, caplog):
        portrait = coffee.transpose(PIL.Image.Transpose.ROTATE_90)  # 400×600 against the 600×400 reference
        with caplog.at_level("WARNING"):
            registration_pipeline([portrait, portrait], reference=coffee, output_type="latent")
        assert caplog.text.count("differ in aspect ratio") == 1
        assert "2 of 2 image(s)" in caplog.text and "image[0] is 400×600, its reference 600×400" in caplog.text
        assert "512×336 (the reference's aspect, longer side 512)" in caplog.text and "Crop or pad" in caplog.text

        caplog.clear()
        nearly = coffee.resize((606, 400), PIL.Image.BICUBIC)  # 1 % wider: the same aspect within the tolerance
        with caplog.at_level("WARNING"):
            registration_pipeline(nearly, reference=coffee, output_type="latent")
        assert "aspect" not in caplog.text

    def test_inputs_too_small_to_align_warn_with_size_and_minimum(self, registration_pipeline, astronaut, caplog):
        tiny = astronaut.resize((4, 4), PIL.Image.BICUBIC)
        with caplog.at_level("WARNING"):
            registration_pipeline(tiny, reference=tiny, height=128, width=128, output_type="latent")
        # 16 latents per side at the VAE factor 8.
        assert caplog.text.count("smaller than 128 px") == 1
        assert "image is 4×4, reference is 4×4" in caplog.text

        caplog.clear()
        least = astronaut.resize((128, 128), PIL.Image.BICUBIC)
        with caplog.at_level("WARNING"):
            registration_pipeline(least, reference=least, height=128, width=128, output_type="latent")
        assert "smaller than" not in caplog.text


class TestSaveLoad:
    def test_round_trip_offline(self, tmp_path, registration_pipeline, astronaut, coffee):
        registration_pipeline.save_pretrained(tmp_path)
        saved = ("model_index.json", "vae/config.json", "stn/config.json", "stn/diffusion_pytorch_model.safetensors")
        for name in saved:
            assert (tmp_path / name).exists()
        loaded = STNAlignmentPipeline.from_pretrained(tmp_path)
        before = registration_pipeline(coffee, reference=astronaut, output_type="pt")
        after = loaded(coffee, reference=astronaut, output_type="pt")
        torch.testing.assert_close(after.theta, before.theta)
        torch.testing.assert_close(after.images, before.images)

    def test_custom_pipeline_entry_point(self, tmp_path, seed_pipeline):
        seed_pipeline.save_pretrained(tmp_path)
        from pathlib import Path

        entry = Path(__file__).resolve().parents[1] / "pipelines" / "stn_alignment.py"
        pipe = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(entry), trust_remote_code=True)
        assert type(pipe).__name__ == "STNAlignmentPipeline" and isinstance(pipe.stn, SpatialTransformer)

    def test_warns_when_stn_was_trained_for_another_vae(self, caplog):
        from stn_diffusers.pipelines.pipeline_stn_alignment import vae_fingerprint

        trained_for = vae_fingerprint(make_tiny_vae(seed=1))
        stn = SpatialTransformer(vae_fingerprint=trained_for)
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.enable_propagation()
        try:
            with caplog.at_level("WARNING"):
                STNAlignmentPipeline(vae=make_tiny_vae(seed=1), stn=stn)
                assert "another VAE" not in caplog.text
                STNAlignmentPipeline(vae=make_tiny_vae(seed=2), stn=stn)
            assert caplog.text.count("another VAE") == 1
        finally:
            diffusers_logging.disable_propagation()


def test_cpu_encode_uses_channels_last_and_keeps_the_vae_trainable(tiny_vae):
    import copy

    pipe = STNAlignmentPipeline(vae=copy.deepcopy(tiny_vae), stn=SpatialTransformer())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        plain = tiny_vae.encode(images).latent_dist.mode() * tiny_vae.config.scaling_factor
    with torch.inference_mode():
        latents = pipe.encode(images)
    torch.testing.assert_close(latents, plain, rtol=1e-4, atol=1e-5)
    weights = [p for p in pipe.vae.encoder.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    # The weights converted under inference mode are normal tensors: a training step still works.
    pipe.vae.encode(images).latent_dist.mode().sum().backward()
    assert all(p.grad is not None for p in weights)
