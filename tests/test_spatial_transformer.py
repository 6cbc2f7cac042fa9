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
    @pytest.mark.parametrize("config", [{}, TINY_REGISTRATION])
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
        torch.testing.assert_close(loaded.predict_theta(sample, reference), model.predict_theta(sample, reference))
