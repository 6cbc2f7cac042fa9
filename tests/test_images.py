"""Image inputs: EXIF orientation on every read, one value rule for numpy and torch, aspect ratios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from stn_diffusers.images import (
    ASPECT_TOLERANCE,
    FLOAT_TOLERANCE,
    aspect_difference,
    load_image,
    open_image,
    tensor_to_pil,
    to_rgb_tensor,
)

ORIENTATION = 0x0112  # the EXIF tag
ROTATE_90_CW = 6  # its value on a phone photo taken upright: the viewer turns the stored pixels 90° clockwise


def save_sideways(upright: PIL.Image.Image, path: Path) -> Path:
    """Store ``upright`` as a phone does: pixels turned 90° counter-clockwise, Orientation 6 to turn them back."""
    exif = PIL.Image.Exif()
    exif[ORIENTATION] = ROTATE_90_CW
    upright.transpose(PIL.Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    return path


@pytest.fixture
def phone_photo(tmp_path, coffee) -> Path:
    """The 600×400 coffee photo as a 400×600 JPEG with EXIF Orientation 6."""
    return save_sideways(coffee, tmp_path / "phone.jpg")


def upright_pixels(path: Path) -> np.ndarray:
    """The stored pixels of ``path`` turned 90° clockwise by hand, as a viewer shows Orientation 6."""
    with PIL.Image.open(path) as stored:
        return np.array(stored.transpose(PIL.Image.Transpose.ROTATE_270))


class TestOrientation:
    def test_open_image_shows_a_phone_photo_upright(self, phone_photo, coffee):
        with PIL.Image.open(phone_photo) as stored:
            assert stored.size == (400, 600)  # stored sideways
        image = open_image(phone_photo)
        assert image.size == coffee.size
        np.testing.assert_array_equal(np.asarray(image), upright_pixels(phone_photo))
        # The upright view is the original photo, up to JPEG loss.
        assert np.abs(np.asarray(image, np.float32) - np.asarray(coffee, np.float32)).mean() < 3.0

    def test_a_pil_image_passed_directly_is_turned_once(self, phone_photo):
        expected = torch.from_numpy(upright_pixels(phone_photo)).permute(2, 0, 1).float() / 255
        with PIL.Image.open(phone_photo) as stored:
            direct = to_rgb_tensor(stored)
        read = to_rgb_tensor(load_image(phone_photo))  # turned on read; converting must not turn it again
        torch.testing.assert_close(direct, expected, rtol=0, atol=0)
        torch.testing.assert_close(read, expected, rtol=0, atol=0)

    def test_an_upright_rgb_image_is_read_as_it_is(self, coffee, monkeypatch):
        from stn_diffusers import images

        def converted(image):
            raise AssertionError("an upright RGB image was converted (copied) before reading")

        expected = torch.from_numpy(np.asarray(coffee, np.float32) / 255).permute(2, 0, 1)
        monkeypatch.setattr(images, "to_pil_rgb", converted)
        tensor = to_rgb_tensor(coffee)
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
        assert tensor.is_contiguous()  # (3, H, W) in memory order, ready to resize and warp

    def test_pipeline_aligns_a_phone_photo_as_a_viewer_shows_it(self, registration_pipeline, phone_photo):
        upright = torch.from_numpy(upright_pixels(phone_photo)).permute(2, 0, 1).float() / 255  # (3, 400, 600)
        call = dict(reference=upright, height=128, width=192, output_type="pt")
        # min_displacement above any motion: the input comes back as the pipeline loaded it.
        out = registration_pipeline(load_image(phone_photo), min_displacement=1e9, **call)
        torch.testing.assert_close(out.warped_images[0], upright, rtol=0, atol=0)
        # θ is the one of the upright pixels, not of a sideways image stretched onto the reference.
        with PIL.Image.open(phone_photo) as stored:
            theta = registration_pipeline(stored, **call).theta
        torch.testing.assert_close(theta, registration_pipeline(upright, **call).theta)


class TestPixelValues:
    def test_integer_dtypes_are_full_scale_for_numpy_and_torch(self, coffee):
        array = np.array(coffee)  # (H, W, 3) uint8
        expected = torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)
        as_uint16 = array.astype(np.uint16) * 257  # 255 → 65535
        for image in (
            array,
            torch.from_numpy(array).permute(2, 0, 1),  # torch.uint8
            as_uint16,
            torch.from_numpy(as_uint16).permute(2, 0, 1),  # torch.uint16
        ):
            torch.testing.assert_close(to_rgb_tensor(image), expected, rtol=0, atol=1e-6)

    def test_bool_is_zero_or_one(self):
        mask = np.zeros((4, 6), bool)
        mask[1:3, 2:5] = True
        expected = torch.from_numpy(mask).float().expand(3, -1, -1)
        torch.testing.assert_close(to_rgb_tensor(mask), expected)
        torch.testing.assert_close(to_rgb_tensor(torch.from_numpy(mask)), expected)

    @pytest.mark.parametrize(
        "to_input", [lambda a: a, lambda a: torch.from_numpy(a).permute(2, 0, 1)], ids=["numpy", "torch"]
    )
    def test_floats_outside_unit_range_raise_naming_both_ranges(self, coffee, to_input):
        scaled = np.asarray(coffee, np.float32)  # 0–255 as floats, the silent mistake
        with pytest.raises(ValueError, match=r"in \[0, 1\], found values in \[0, 255\].*divide by 255"):
            to_rgb_tensor(to_input(scaled))
        with pytest.raises(ValueError, match=r"found values in \[-1, 1\]"):
            to_rgb_tensor(to_input(scaled / 127.5 - 1))
        with_nan = scaled / 255
        with_nan[0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="found NaN"):
            to_rgb_tensor(to_input(with_nan))

    def test_resampling_overshoot_is_clamped_and_more_rejected(self):
        image = torch.full((3, 4, 4), 0.5)
        image[0, 0, 0], image[1, 0, 0] = 1 + FLOAT_TOLERANCE / 2, -FLOAT_TOLERANCE / 2
        converted = to_rgb_tensor(image)
        assert converted.max() == 1.0 and converted.min() == 0.0
        image[0, 0, 0] = 1 + 2 * FLOAT_TOLERANCE
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            to_rgb_tensor(image)

    def test_other_integer_dtypes_are_rejected(self):
        with pytest.raises(TypeError, match="uint8 .* got int64"):
            to_rgb_tensor(np.zeros((4, 4, 3), np.int64))
        with pytest.raises(TypeError, match="got int32"):
            to_rgb_tensor(torch.zeros(3, 4, 4, dtype=torch.int32))

    def test_pipeline_reads_a_torch_uint8_image_like_its_float_twin(self, registration_pipeline, coffee):
        uint8 = torch.from_numpy(np.array(coffee)).permute(2, 0, 1)
        call = dict(reference=coffee, height=128, width=192, output_type="latent")
        theta = registration_pipeline(uint8, **call).theta
        torch.testing.assert_close(theta, registration_pipeline(uint8.float() / 255, **call).theta)
        with pytest.raises(ValueError, match="divide by 255"):
            registration_pipeline(uint8.float(), **call)


class TestToPil:
    def test_rounds_to_the_nearest_byte_clamps_and_leaves_the_input_as_it_was(self):
        image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
        image[0, 0, 0], image[1, 0, 0] = -0.5, 1.5  # outside [0, 1]: clamped
        before = image.clone()
        picture = tensor_to_pil(image)
        assert picture.mode == "RGB" and picture.size == (7, 5)
        expected = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(picture), expected)
        assert torch.equal(image, before)


class TestAspectDifference:
    def test_same_aspect_at_any_size_is_zero_and_the_difference_is_symmetric(self):
        assert aspect_difference((400, 600), (800, 1200)) == 0.0
        assert aspect_difference((400, 600), (512, 512)) == pytest.approx(0.5)
        assert aspect_difference((512, 512), (400, 600)) == pytest.approx(0.5)
        assert aspect_difference((400, 600), (400, 604)) < ASPECT_TOLERANCE < aspect_difference((400, 600), (400, 620))
