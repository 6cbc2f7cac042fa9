import json

import numpy as np
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
        model = SpatialTransformer(**STN_PRESETS["correlation"])
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


# Hand-set pass-through STNs (see `pass_through_features`): 8 latent channels, strides 4 then 2.
PASS_THROUGH = {
    **TINY_REGISTRATION, "in_channels": 8, "feature_channels": (16, 16, 16, 16), "feature_dim": 16,
    "iteration_strides": (4, 2), "search_radius": (3, 2), "num_iterations": 4,
}  # fmt: skip


def pass_through_stn(transform: str, match_scale: float) -> SpatialTransformer:
    """A pass-through STN fitting ``transform``, its soft-argmax sharpened to ``exp(match_scale)``."""
    model = SpatialTransformer(**{**PASS_THROUGH, "transform": transform})
    pass_through_features(model)
    with torch.no_grad():
        model.log_match_scale.fill_(match_scale)
    return model


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
        homography = pass_through_stn("homography", 3.0)
        affine = SpatialTransformer(**{**PASS_THROUGH, "transform": "affine"})
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


def shift_theta(dx: float, dy: float, height: int, width: int) -> torch.Tensor:
    """θ ``(1, 2, 3)`` of a shift by ``(dx, dy)`` cells of an ``height × width`` grid."""
    theta = geometry.identity_theta(1)
    theta[0, 0, 2], theta[0, 1, 2] = 2 * dx / width, 2 * dy / height
    return theta


class TestReferenceWeights:
    def test_no_weights_and_all_ones_give_the_same_theta_bit_for_bit(self):
        torch.manual_seed(0)
        model = perturbed_registration()
        sample, reference = latents(2, 4, 48, 64), latents(2, 4, 48, 64, seed=1)
        with torch.no_grad():
            plain = model.predict_theta(sample, reference)
            ones = model.predict_theta(sample, reference, reference_weights=torch.ones(2, 1, 48, 64))
            half = model.predict_theta(sample, reference, reference_weights=zero_left_columns(2, 48, 64, 20))
        assert torch.equal(plain, ones)
        assert not torch.allclose(plain, half)  # the weights do reach the fit

    def test_ignored_cells_get_zero_weight_and_half_covered_cells_half_in_every_fit(self, monkeypatch):
        model = SpatialTransformer(**{**TINY_REGISTRATION, "num_iterations": 4})  # strides 8, 4, 2, 2
        fitted_weights = []
        fit_affine = geometry.fit_affine

        def spy(source, target, weights, *args):
            fitted_weights.append(weights.detach().clone())
            return fit_affine(source, target, weights, *args)

        monkeypatch.setattr(geometry, "fit_affine", spy)
        # Columns 0-19 of 64 ignored: at stride 8, cells 0-1 fully (0 weight) and cell 2 half (0.5).
        weights = zero_left_columns(1, 32, 64, 20)
        model.predict_theta(latents(1, 4, 32, 64), latents(1, 4, 32, 64, seed=1), reference_weights=weights)
        assert len(fitted_weights) == 4  # one fit per cascade iteration, each with the mask applied
        for stride, fitted in zip((8, 4, 2, 2), fitted_weights):
            grid = fitted.view(32 // stride, 64 // stride)  # zero-initialised confidences are all 1
            expected = torch.nn.functional.avg_pool2d(weights, stride)[0, 0]
            torch.testing.assert_close(grid, expected)
        assert fitted_weights[0][0, :3].tolist() == [0.0, 0.0, 0.5]

    def test_an_ignored_pasted_region_no_longer_drags_the_estimate(self):
        # Hand-set features (the latents themselves): the fit sees every cell's true match. A pasted region
        # that moved otherwise drags the unweighted fit; weighted out, the estimate is as good as on a clean pair.
        height = width = 64
        model = pass_through_stn("affine", 4.0)
        smooth = torch.nn.functional.avg_pool2d(latents(1, 8, height + 16, width + 16), 5, 1, 2)
        reference = smooth[:, :, 8 : height + 8, 8 : width + 8]
        truth, other = shift_theta(3, -2, height, width), shift_theta(-3, 3, height, width)
        clean = geometry.warp(reference, geometry.invert_theta(truth), padding_mode="border")
        pasted = geometry.warp(reference, geometry.invert_theta(other), padding_mode="border")
        changed = torch.zeros(1, 1, height, width)
        changed[..., 8:44, 10:46] = 1  # 32 % of the moving latents
        moving = clean * (1 - changed) + pasted * changed
        kept = 1 - geometry.warp(changed, truth, mode="nearest")  # the changed cells, in the reference frame
        with torch.no_grad():
            errors = {
                name: geometry.corner_error(model.predict_theta(sample, reference, **kwargs), truth, height, width)
                for name, sample, kwargs in [
                    ("clean", clean, {}), ("unweighted", moving, {}), ("weighted", moving, {"reference_weights": kept}),
                ]
            }  # fmt: skip
        assert errors["weighted"] < 1.5 * errors["clean"], errors
        assert errors["unweighted"] > 3 * errors["weighted"], errors

    @pytest.mark.parametrize(
        "weights, error, message",
        [
            (torch.ones(1, 1, 32, 32), ValueError, r"reference_weights of shape \(2, 1, 64, 64\)"),
            (torch.ones(2, 3, 64, 64), ValueError, r"reference_weights of shape \(2, 1, 64, 64\)"),
            (torch.full((2, 1, 64, 64), 2.0), ValueError, r"in \[0, 1\] \(1 = use the cell\), found .*\[2, 2\]"),
            (torch.full((2, 1, 64, 64), float("nan")), ValueError, r"in \[0, 1\]"),
            (torch.ones(2, 1, 64, 64) * torch.tensor([1.0, 0.0]).view(2, 1, 1, 1), ValueError, r"all zeros at .*\[1\]"),
            (np.ones((2, 1, 64, 64)), TypeError, "torch.Tensor of shape"),
        ],
    )  # fmt: skip
    def test_bad_weights_are_named_errors(self, weights, error, message):
        model = SpatialTransformer(**TINY_REGISTRATION)
        with pytest.raises(error, match=message):
            model.predict_theta(latents(2, 4, 64, 64), latents(2, 4, 64, 64, seed=1), reference_weights=weights)

    def test_seed_design_refuses_weights_it_cannot_use(self):
        model = SpatialTransformer(conditioning="reference")
        assert not model.supports_reference_weights
        assert SpatialTransformer(**TINY_REGISTRATION).supports_reference_weights
        with pytest.raises(ValueError, match="reference_weights=None for architecture='seed'.*'correlation'"):
            model(latents(1, 4, 64, 64), latents(1, 4, 64, 64, seed=1), reference_weights=torch.ones(1, 1, 64, 64))


def zero_left_columns(batch: int, height: int, width: int, columns: int) -> torch.Tensor:
    """Reference weights ``(batch, 1, height, width)``: 0 on the first ``columns`` columns, 1 elsewhere."""
    weights = torch.ones(batch, 1, height, width)
    weights[..., :columns] = 0
    return weights


def perturbed_registration() -> SpatialTransformer:
    """A tiny registration STN moved off its initialisation (open gates, non-constant confidences)."""
    model = SpatialTransformer(**{**TINY_REGISTRATION, "num_iterations": 3})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        model.residual_gate.fill_(0.5)
    return model


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
