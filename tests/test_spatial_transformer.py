import json

import pytest
import torch

from stn_diffusers import STN_PRESETS, SpatialTransformer, SpatialTransformerOutput, geometry
from stn_diffusers.models.correlation_localizer import CorrelationLocalizer
from stn_diffusers.models.seed_localizer import SeedLocalizer
from stn_diffusers.models.spatial_transformer import cell_centres, local_correlation

from .conftest import TINY_REGISTRATION


def latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TestSeedDesign:
    def test_parameter_count_and_module_names(self):
        model = SpatialTransformer()
        assert sum(p.numel() for p in model.parameters()) == 352_710
        names = [name for name, _ in model.named_parameters()]
        assert names == [
            "localization.0.weight", "localization.0.bias", "localization.3.weight", "localization.3.bias",
            "fc_loc.0.weight", "fc_loc.0.bias", "fc_loc.2.weight", "fc_loc.2.bias",
        ]  # fmt: skip
        assert model.fc_loc[2].weight.abs().max() == 0
        assert model.fc_loc[2].bias.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    def test_is_identity_at_initialisation(self):
        sample = latents(4, 4, 64, 64)
        out = SpatialTransformer()(sample)
        assert isinstance(out, SpatialTransformerOutput)
        torch.testing.assert_close(out.theta, geometry.identity_theta(4), rtol=0, atol=0)
        assert (out.sample - sample).abs().mean() < 1e-5

    @pytest.mark.parametrize("transform", ["affine", "similarity", "translation"])
    @pytest.mark.parametrize("conditioning", ["none", "reference"])
    def test_every_transform_starts_at_identity(self, transform, conditioning):
        model = SpatialTransformer(transform=transform, conditioning=conditioning, num_iterations=2)
        sample = latents(2, 4, 64, 64)
        reference = latents(2, 4, 64, 64, seed=1) if conditioning == "reference" else None
        torch.testing.assert_close(model.predict_theta(sample, reference), geometry.identity_theta(2))

    def test_transform_restricts_the_degrees_of_freedom(self):
        torch.manual_seed(0)
        for transform in ("translation", "similarity"):
            model = SpatialTransformer(transform=transform)
            torch.nn.init.normal_(model.fc_loc[2].weight, std=0.5)
            theta = model.predict_theta(latents(3, 4, 64, 64))
            linear = theta[:, :, :2]
            if transform == "translation":
                torch.testing.assert_close(linear, torch.eye(2).expand(3, 2, 2))
            else:  # similarity: [[a, -b], [b, a]]
                torch.testing.assert_close(linear[:, 0, 0], linear[:, 1, 1])
                torch.testing.assert_close(linear[:, 0, 1], -linear[:, 1, 0])
            assert theta[:, :, 2].abs().max() > 0

    def test_rejects_other_sizes(self):
        with pytest.raises(ValueError, match=r"spatial size \(64, 64\)"):
            SpatialTransformer()(latents(1, 4, 96, 96))

    def test_rejects_another_sample_size_when_built(self):
        # Its linear layer reads the features of 64×64 latents: any other size could never run.
        with pytest.raises(ValueError, match="expected sample_size=64 for architecture='seed' .* got 32"):
            SpatialTransformer(sample_size=32)


class TestRegistrationDesign:
    @pytest.mark.parametrize("size", [(64, 64), (96, 96), (64, 96), (128, 128)])
    def test_three_iterations_work_at_any_size(self, size):
        model = SpatialTransformer(**{**TINY_REGISTRATION, "num_iterations": 3})
        sample, reference = latents(2, 4, *size), latents(2, 4, *size, seed=1)
        out = model(sample, reference)
        assert out.sample.shape == sample.shape and out.theta.shape == (2, 2, 3)
        thetas = model.predict_theta(sample, reference, return_intermediate=True)
        assert len(thetas) == 3

    def test_full_preset_builds_and_starts_at_identity(self):
        model = SpatialTransformer(**STN_PRESETS["registration"])
        sample, reference = latents(2, 4, 64, 64), latents(2, 4, 64, 64, seed=1)
        torch.testing.assert_close(model.predict_theta(sample, reference), geometry.identity_theta(2))

    def test_gradient_reaches_the_first_layer_once_gates_open(self):
        model = SpatialTransformer(**TINY_REGISTRATION)
        with torch.no_grad():
            model.residual_gate.fill_(1.0)
        sample, reference = latents(2, 4, 64, 64), latents(2, 4, 64, 64, seed=1)
        target = geometry.random_theta(2, "standard", 512, 512, torch.Generator().manual_seed(0))
        geometry.corner_error(model.predict_theta(sample, reference), target, 512, 512).mean().backward()
        assert model.localization.stem[0].weight.grad.abs().sum() > 0

    def test_recovers_a_pure_latent_translation_when_features_match(self):
        # With confidences equal and sharp matching, the soft-argmax fit of a shifted copy finds the shift.
        torch.manual_seed(0)
        model = SpatialTransformer(**{**TINY_REGISTRATION, "transform": "translation", "num_iterations": 3})
        with torch.no_grad():
            model.residual_gate.fill_(1.0)
            model.log_match_scale.fill_(4.0)
        reference = torch.nn.functional.avg_pool2d(latents(1, 4, 72, 72), 3, 1, 1)[:, :, 4:68, 4:68]
        shift = torch.zeros(1, 2, 3)
        shift[0, :, :2] = torch.eye(2)
        shift[0, 0, 2] = 4 * 2 / 64  # 4 latent cells
        moving = geometry.warp(reference, geometry.invert_theta(shift), padding_mode="border")
        theta = model.predict_theta(moving, reference)
        error = geometry.corner_error(theta, shift, 64, 64).item()
        identity_error = geometry.corner_error(geometry.identity_theta(1), shift, 64, 64).item()
        assert error < identity_error


# A correlation STN that fits homographies, small enough for tests that run in seconds.
TINY_HOMOGRAPHY = {**TINY_REGISTRATION, "transform": "homography"}
# Added before the ReLUs and removed by the projections of `pass_through_features`: keeps the
# (GroupNorm-centred) latents positive through every ReLU, so no sign is lost.
RELU_OFFSET = 5.0


def pass_through_features(model: SpatialTransformer) -> None:
    """Hand-set the correlation pyramid so its features are the latents themselves, box-filtered at
    each stride (anti-aliased) and centred by GroupNorm: what is left to test is the fit and the cascade."""
    pyramid, channels = model.localization, model.config.in_channels
    eye = torch.eye(channels)
    with torch.no_grad():
        for parameter in pyramid.parameters():
            parameter.zero_()
        pyramid.stem[0].weight[:channels, :channels, 1, 1] = eye
        pyramid.stem[0].bias[:channels] = RELU_OFFSET
        for block in pyramid.blocks:
            block[0].weight[:channels, :channels] = eye[:, :, None, None] / 9  # 3×3 box, stride 2
            block[3].weight[:channels, :channels, 1, 1] = eye
            for norm in (block[1], block[4]):
                norm.weight.fill_(1.0)
                norm.bias.fill_(RELU_OFFSET)
        for projection in pyramid.projections:
            projection.weight[:channels, :channels, 0, 0] = eye
            projection.bias[:channels] = -RELU_OFFSET
        model.residual_gate.fill_(1.0)


class TestHomographyDesign:
    @pytest.mark.parametrize("size", [(16, 16), (16, 24), (64, 64), (48, 80), (96, 64)])
    def test_theta_is_a_normalised_3x3_at_any_size(self, size):
        model = SpatialTransformer(**{**TINY_HOMOGRAPHY, "num_iterations": 3})
        with torch.no_grad():
            model.residual_gate.fill_(0.5)  # open: the fitted homographies reach the output
        sample, reference = latents(2, 4, *size), latents(2, 4, *size, seed=1)
        out = model(sample, reference)
        assert out.sample.shape == sample.shape and out.theta.shape == (2, 3, 3)
        assert torch.isfinite(out.theta).all()
        torch.testing.assert_close(out.theta[:, 2, 2], torch.ones(2))
        thetas = model.predict_theta(sample, reference, return_intermediate=True)
        assert [tuple(theta.shape) for theta in thetas] == [(2, 3, 3)] * 3
        assert thetas[-1][:, 2, :2].abs().max() > 0  # a projective part, not an affine θ in 3×3 form

    @pytest.mark.parametrize("size", [(64, 64), (48, 80)])
    def test_is_exactly_the_identity_at_initialisation(self, size):
        model = SpatialTransformer(**{**TINY_HOMOGRAPHY, "num_iterations": 3})
        sample, reference = latents(2, 4, *size), latents(2, 4, *size, seed=1)
        out = model(sample, reference)
        torch.testing.assert_close(out.theta, torch.eye(3).expand(2, 3, 3), rtol=0, atol=0)
        torch.testing.assert_close(out.sample, sample, rtol=0, atol=1e-4)  # grid_sample's float32 rounding

    def test_other_transforms_keep_the_affine_shape(self):
        for transform in ("affine", "similarity", "translation"):
            model = SpatialTransformer(**{**TINY_REGISTRATION, "transform": transform})
            assert model(latents(1, 4, 48, 80), latents(1, 4, 48, 80, seed=1)).theta.shape == (1, 2, 3)

    def test_gates_get_a_gradient_at_initialisation(self):
        # Zero gates make the output the identity, but training must still be able to open them.
        model = SpatialTransformer(**{**TINY_HOMOGRAPHY, "num_iterations": 3})
        target = geometry.random_theta(2, "projective", 384, 640, torch.Generator().manual_seed(0))
        theta = model.predict_theta(latents(2, 4, 48, 80), latents(2, 4, 48, 80, seed=1))
        geometry.corner_error(theta, target, 384, 640).mean().backward()
        assert (model.residual_gate.grad != 0).all()

    def test_gradient_reaches_every_trainable_parameter(self):
        torch.manual_seed(0)
        model = SpatialTransformer(**{**TINY_HOMOGRAPHY, "num_iterations": 3})
        with torch.no_grad():
            # Off the initialisation: the zero last layer of each confidence head blocks the layer before it.
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.01)
            model.residual_gate.fill_(0.5)
        target = geometry.random_theta(2, "projective", 512, 512, torch.Generator().manual_seed(0))
        theta = model.predict_theta(latents(2, 4, 64, 64), latents(2, 4, 64, 64, seed=1))
        geometry.corner_error(theta, target, 512, 512).mean().backward()
        # The match weights are normalised, so a constant log-confidence (the last bias) cancels: its
        # gradient is zero up to rounding, by design.
        cancelling = {f"confidence.{level}.2.bias" for level in range(len(model.config.iteration_strides))}
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            if name not in cancelling:
                assert parameter.grad.abs().sum() > 0, name

    @pytest.mark.parametrize("size", [(64, 64), (48, 80)])
    def test_recovers_a_perspective_warp_that_an_affine_fit_cannot(self, size):
        # The same hand-set weights fitted both ways: only the homography fit can follow a perspective warp.
        height, width = size
        config = {
            **TINY_HOMOGRAPHY, "in_channels": 8, "feature_channels": (16, 16, 16, 16), "feature_dim": 16,
            "iteration_strides": (4, 2), "search_radius": (3, 2), "num_iterations": 4,
        }  # fmt: skip
        homography = SpatialTransformer(**config)
        pass_through_features(homography)
        with torch.no_grad():
            homography.log_match_scale.fill_(3.0)
        affine = SpatialTransformer(**{**config, "transform": "affine"})
        affine.load_state_dict(homography.state_dict())
        smooth = torch.nn.functional.avg_pool2d(latents(1, 8, height + 8, width + 8), 5, 1, 2)
        reference = smooth[:, :, 4 : height + 4, 4 : width + 4]
        truth = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.1, -0.08, 1.0]]])  # corners move 3-7 cells
        moving = geometry.warp(reference, geometry.invert_theta(truth), padding_mode="border")
        with torch.no_grad():
            estimate = homography.predict_theta(moving, reference)
            affine_estimate = affine.predict_theta(moving, reference)
        error = geometry.corner_error(estimate, truth, height, width).item()
        affine_error = geometry.corner_error(affine_estimate, truth, height, width).item()
        identity_error = geometry.corner_error(geometry.identity_theta(1), truth, height, width).item()
        assert error < 0.4 * identity_error, f"{identity_error:.2f} → {error:.2f} latent cells"
        assert affine_error > 2 * error, f"homography {error:.2f}, affine {affine_error:.2f} latent cells"

    def test_seed_design_refuses_homographies(self):
        with pytest.raises(ValueError, match=r"transform in \('affine', 'similarity', 'translation'\) for "
                           r"architecture='seed', got 'homography'; architecture='correlation'"):
            SpatialTransformer(transform="homography")


class TestLocalizers:
    def test_architecture_chooses_the_localizer_and_its_size_limits(self):
        seed, registration = SpatialTransformer(), SpatialTransformer(**TINY_REGISTRATION)
        assert isinstance(seed.localizer, SeedLocalizer) and isinstance(registration.localizer, CorrelationLocalizer)
        assert (seed.fixed_sample_size, seed.min_sample_size) == (64, 64)
        assert (registration.fixed_sample_size, registration.min_sample_size) == (None, 16)
        coarse = SpatialTransformer(**{**TINY_REGISTRATION, "iteration_strides": (4, 2), "search_radius": (3, 2)})
        assert coarse.min_sample_size == 8

    def test_head_parameters_are_the_layers_that_turn_features_into_theta(self):
        seed, registration = SpatialTransformer(), SpatialTransformer(**TINY_REGISTRATION)
        assert [id(p) for p in seed.head_parameters()] == [id(seed.fc_loc[2].weight), id(seed.fc_loc[2].bias)]
        expected = [registration.residual_gate, registration.log_match_scale, *registration.confidence.parameters()]
        assert [id(p) for p in registration.head_parameters()] == [id(p) for p in expected]

    def test_local_correlation_peaks_at_the_displacement(self):
        reference = torch.nn.functional.normalize(latents(1, 8, 6, 6), dim=1)
        moving = torch.roll(reference, shifts=1, dims=-1)  # content one cell to the right
        correlation = local_correlation(reference, moving, radius=1)  # (1, 9, 6, 6)
        # channel i·3 + j holds (dy, dx) = (i - 1, j - 1): the match is at (0, +1), channel 5
        assert (correlation[0, :, :, :5].argmax(dim=0) == 5).all()

    def test_cell_centres_are_pixel_centres_in_normalised_coordinates(self):
        centres = cell_centres(2, 4, torch.zeros(1))
        assert centres.tolist() == [
            [-0.75, -0.5], [-0.25, -0.5], [0.25, -0.5], [0.75, -0.5],
            [-0.75, 0.5], [-0.25, 0.5], [0.25, 0.5], [0.75, 0.5],
        ]  # fmt: skip


class TestValidation:
    @pytest.mark.parametrize(
        "sample, reference, message",
        [
            (torch.zeros(4, 64, 64), None, r"shape \(B, 4, H, W\)"),
            (torch.zeros(1, 3, 64, 64), None, "4 channels"),
            (torch.full((1, 4, 64, 64), float("nan")), None, "finite"),
            (torch.zeros(1, 4, 64, 64), torch.zeros(1, 4, 64, 64), "reference=None"),
        ],
    )
    def test_seed_rejects_bad_inputs(self, sample, reference, message):
        with pytest.raises(ValueError, match=message):
            SpatialTransformer()(sample, reference)

    def test_reference_model_rejects_missing_or_mismatched_reference(self):
        model = SpatialTransformer(**TINY_REGISTRATION)
        with pytest.raises(ValueError, match=r"expected a reference of shape \(1, 4, 64, 64\)"):
            model(torch.zeros(1, 4, 64, 64))
        with pytest.raises(ValueError, match=r"expected reference of shape \(1, 4, 64, 64\)"):
            model(torch.zeros(1, 4, 64, 64), torch.zeros(2, 4, 64, 64))
        with pytest.raises(ValueError, match="at least 16"):
            model(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))

    def test_sample_must_be_a_tensor(self):
        with pytest.raises(TypeError, match="torch.Tensor"):
            SpatialTransformer()([[0.0]])

    @pytest.mark.parametrize(
        "kwargs, message",
        [
            ({"transform": "projective"}, "transform in"),
            ({"conditioning": "text"}, "conditioning in"),
            ({"num_iterations": 0}, "num_iterations >= 1"),
            ({"architecture": "correlation"}, "conditioning='reference'"),
            ({"padding_mode": "wrap"}, "padding_mode in"),
        ],
    )
    def test_bad_config_raises(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            SpatialTransformer(**kwargs)


class TestSaveLoad:
    @pytest.mark.parametrize("config", [{}, TINY_REGISTRATION, TINY_HOMOGRAPHY])
    def test_round_trip(self, tmp_path, config):
        torch.manual_seed(0)
        model = SpatialTransformer(**config)
        for parameter in model.parameters():  # move away from the initialisation
            parameter.data.add_(torch.randn_like(parameter) * 0.01)
        model.save_pretrained(tmp_path)
        assert (tmp_path / "config.json").exists() and (tmp_path / "diffusion_pytorch_model.safetensors").exists()
        loaded = SpatialTransformer.from_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert {k: v for k, v in json.loads(loaded.to_json_string()).items() if k != "_name_or_path"} == saved
        sample = latents(2, 4, 64, 64)
        reference = latents(2, 4, 64, 64, seed=1) if config else None
        theta = model.predict_theta(sample, reference)
        assert loaded.config.transform == saved["transform"] == model.config.transform
        assert theta.shape == ((2, 3, 3) if model.config.transform == "homography" else (2, 2, 3))
        torch.testing.assert_close(loaded.predict_theta(sample, reference), theta)
