"""Zero padding in the moving image: found from the pixels, and left out of the match."""

import numpy as np
import pytest
import torch

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline, geometry
from stn_diffusers.content import content_weights
from tests.conftest import TINY_SEARCH_REFINE
from tests.test_search_refine import error_px, moved, similarity, smooth_field


@pytest.fixture
def coffee_tensor(coffee) -> torch.Tensor:
    """skimage's coffee cup, ``(3, 400, 600)`` in ``[0, 1]``: no exactly black region."""
    return torch.from_numpy(np.array(coffee)).permute(2, 0, 1).float().div(255)


@pytest.fixture
def photo(photo_tensor) -> torch.Tensor:
    """The astronaut, ``(3, 512, 512)`` in ``[0, 1]``."""
    return photo_tensor[0]


def rotated_with_padding(photo: torch.Tensor, degrees: float, scale: float = 0.8) -> torch.Tensor:
    """``photo`` ``(3, H, W)`` rotated and zoomed out, black where the warp samples outside it."""
    theta = geometry.invert_theta(similarity(degrees, scale))
    return geometry.warp(photo[None], theta, padding_mode="zeros")[0].clamp(0, 1)


class TestContentWeights:
    def test_finds_the_black_corners_of_a_rotated_photo(self, photo):
        weights = content_weights(rotated_with_padding(photo, 30.0)[None], (64, 64))
        assert weights.shape == (1, 1, 64, 64)
        assert set(weights.unique().tolist()) == {0.0, 1.0}
        assert weights[0, 0, 0, 0] == 0 and weights[0, 0, -1, -1] == 0  # corners: padding
        assert weights[0, 0, 24:40, 24:40].min() == 1  # centre: the photo
        assert 0.3 < 1 - weights.mean() < 0.7

    def test_a_photo_without_padding_has_none(self, coffee_tensor):
        assert content_weights(coffee_tensor[None], (64, 64)) is None

    def test_exactly_black_photo_content_at_the_border_counts_as_padding(self, photo):
        # The astronaut's suit is exactly black where it meets the bottom and right edges.
        weights = content_weights(photo[None], (64, 64))
        assert weights[0, 0, -1, 48:].min() == 0 and weights[0, 0, 40:, -1].min() == 0
        assert weights[0, 0, :32, :32].min() == 1
        assert weights.mean() > 0.75

    def test_black_inside_the_frame_is_content(self, coffee_tensor):
        image = coffee_tensor.clone()
        image[:, 200:300, 200:300] = 0  # a black object away from the border
        assert content_weights(image[None], (64, 64)) is None
        image[:, :, :40] = 0  # a black bar on the left edge is padding
        weights = content_weights(image[None], (64, 64))
        assert weights[0, 0, :, :5].max() == 0 and weights[0, 0, 32, 32] == 1

    def test_an_all_black_image_is_taken_whole(self):
        weights = content_weights(torch.zeros(1, 3, 64, 64), (8, 8))
        torch.testing.assert_close(weights, torch.ones(1, 1, 8, 8))

    def test_any_image_size(self, photo):
        image = torch.nn.functional.interpolate(rotated_with_padding(photo, 20.0)[None], size=(300, 420))
        assert content_weights(image, (40, 56)).shape == (1, 1, 40, 56)

    def test_padding_in_an_uneven_border_bin_and_in_one_image_of_a_batch_is_found(self, photo):
        # 70 px over 8 cells: the border bins are 9 px wide, wider than 70 / 8.
        clean = torch.nn.functional.interpolate(photo[None], size=(70, 70), mode="bilinear").clamp(0.01, 1)
        padded = clean.clone()
        padded[..., 61:] = 0  # exactly the last column of cells
        weights = content_weights(torch.cat([clean, padded]), (8, 8))
        assert weights[0].min() == 1
        assert weights[1, 0, :, -1].max() == 0 and weights[1, 0, :, :6].min() == 1

    def test_bad_shape_names_the_expected_one(self):
        with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
            content_weights(torch.zeros(3, 64, 64), (8, 8))


class TestMovingWeights:
    def test_padding_content_cannot_pull_the_estimate(self):
        # Whatever the padded cells hold (the VAE's response to a black border differs from photo to
        # photo), with the weights the answer stays the same; without them it follows the padding.
        model = SpatialTransformer(**TINY_SEARCH_REFINE).eval()
        reference = smooth_field(64, 64, seed=3)
        truth = similarity(15.0, 0.9, 0.05, -0.05)
        moving = moved(reference, truth)
        weights = torch.ones(1, 1, 64, 64)
        weights[..., :, :20] = 0
        answers = {}
        for seed in (1, 2):
            corrupted = moving.clone()
            corrupted[..., :, :20] = 6 * smooth_field(64, 20, seed=seed)
            with torch.no_grad():
                answers[seed, True] = model.predict_theta(corrupted, reference, moving_weights=weights)
                answers[seed, False] = model.predict_theta(corrupted, reference)
        for seed in (1, 2):
            assert error_px(answers[seed, True], truth, 64, 64) < 2.0
        assert error_px(answers[1, True], answers[2, True], 64, 64) < 0.2
        assert error_px(answers[1, False], answers[2, False], 64, 64) > 1.0

    def test_ones_change_nothing(self):
        model = SpatialTransformer(**TINY_SEARCH_REFINE).eval()
        reference = smooth_field(48, 64, seed=4)
        moving = moved(reference, similarity(-20.0, 1.1, 0.1, 0.0, aspect=64 / 48))
        with torch.no_grad():
            plain = model.predict_theta(moving, reference)
            weighted = model.predict_theta(moving, reference, moving_weights=torch.ones(1, 1, 48, 64))
        torch.testing.assert_close(weighted, plain)

    @pytest.mark.parametrize(
        "weights, message",
        [
            (torch.ones(1, 1, 32, 32), r"moving_weights of shape \(1, 1, 64, 64\)"),
            (torch.full((1, 1, 64, 64), 2.0), r"moving_weights in \[0, 1\]"),
            (torch.zeros(1, 1, 64, 64), "keep some cells of every sample"),
        ],
    )
    def test_bad_weights_name_the_expected_value(self, weights, message):
        model = SpatialTransformer(**TINY_SEARCH_REFINE)
        with pytest.raises(ValueError, match=message):
            model.predict_theta(torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64), moving_weights=weights)

    def test_designs_without_them_refuse(self):
        from stn_diffusers import STN_PRESETS

        seed = SpatialTransformer(**{**STN_PRESETS["seed"], "in_channels": 4, "sample_size": 64})
        with pytest.raises(ValueError, match="expected moving_weights=None"):
            seed.predict_theta(torch.randn(1, 4, 64, 64), moving_weights=torch.ones(1, 1, 64, 64))


class TestPipeline:
    @pytest.fixture
    def pipe(self, tiny_vae) -> STNAlignmentPipeline:
        return STNAlignmentPipeline(vae=tiny_vae, stn=SpatialTransformer(**TINY_SEARCH_REFINE))

    def test_finds_padding_in_the_moving_image_only_when_there_is_some(self, pipe, photo, coffee_tensor):
        padded = rotated_with_padding(photo, 30.0)
        assert pipe.content_weights([coffee_tensor], (64, 64)) is None
        weights = pipe.content_weights([coffee_tensor, padded], (64, 64))
        assert weights.shape == (2, 1, 64, 64)
        assert weights[0].min() == 1 and weights[1].min() == 0

    def test_a_design_without_moving_weights_gets_none(self, registration_pipeline, photo):
        assert registration_pipeline.content_weights([rotated_with_padding(photo, 30.0)], (64, 64)) is None

    def test_call_passes_the_weights_unless_told_not_to(self, pipe, photo, monkeypatch):
        seen = []
        original = pipe.stn.predict_theta

        def spy(*args, **kwargs):
            seen.append(kwargs.get("moving_weights"))
            return original(*args, **kwargs)

        monkeypatch.setattr(pipe.stn, "predict_theta", spy)
        padded = rotated_with_padding(photo, 10.0, scale=0.9)
        for ignore_padding in (True, False):
            out = pipe(padded, reference=photo, output_type="latent", ignore_padding=ignore_padding)
            assert out.theta.shape == (1, 2, 3) and torch.isfinite(out.theta).all()
        assert seen[0] is not None and seen[0].min() == 0 and seen[1] is None
