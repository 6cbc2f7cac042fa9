"""Saved weights keep loading: state-dict keys, the embedded default pipeline and its packaging."""

import configparser
import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import stn_diffusers
from stn_diffusers import STN_PRESETS, SpatialTransformer, load_default
from stn_diffusers.default import DEFAULT_PIPELINE_DIR, EMBEDDED_PIPELINES

REPO_ROOT = Path(__file__).resolve().parents[1]
STN_WEIGHTS = DEFAULT_PIPELINE_DIR / "stn" / "diffusion_pytorch_model.safetensors"

# The keys of the published seed design's weights.
SEED_KEYS = [
    "localization.0.weight", "localization.0.bias", "localization.3.weight", "localization.3.bias",
    "fc_loc.0.weight", "fc_loc.0.bias", "fc_loc.2.weight", "fc_loc.2.bias",
]  # fmt: skip

# The keys of the registration design's weights (those of the shipped default): the feature net's
# residual branch, 1×1 conv (0), SiLU, 1×1 conv (2).
REGISTRATION_KEYS = [f"localization.residual.{layer}.{p}" for layer in (0, 2) for p in ("weight", "bias")]

# The keys of the correlation design's weights (the first registration design): each pyramid block
# is conv (0), GroupNorm (1), ReLU, conv (3), GroupNorm (4); each confidence head conv (0), ReLU, conv (2).
CORRELATION_KEYS = [
    "log_match_scale",
    "residual_gate",
    "localization.stem.0.weight",
    "localization.stem.0.bias",
    *(f"localization.blocks.{b}.{layer}.{p}" for b in range(3) for layer in (0, 1, 3, 4) for p in ("weight", "bias")),
    *(f"localization.projections.{level}.{p}" for level in range(3) for p in ("weight", "bias")),
    *(f"confidence.{level}.{layer}.{p}" for level in range(3) for layer in (0, 2) for p in ("weight", "bias")),
]


# The registration design refining a homography: the same weights, another motion model.
HOMOGRAPHY_REGISTRATION = {**STN_PRESETS["registration"], "transform": "homography"}


def perturbed(model: SpatialTransformer) -> SpatialTransformer:
    """``model`` moved away from its initialisation, so that a load that keeps the initial values fails."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return model


class TestStateDictKeys:
    def test_seed_keys_are_the_published_ones(self):
        assert list(SpatialTransformer().state_dict()) == SEED_KEYS

    def test_registration_keys_are_the_recorded_ones(self):
        assert list(SpatialTransformer(**STN_PRESETS["registration"]).state_dict()) == REGISTRATION_KEYS

    def test_correlation_keys_are_the_recorded_ones(self):
        # Pipelines saved with the first registration design keep loading under the `correlation` preset.
        assert list(SpatialTransformer(**STN_PRESETS["correlation"]).state_dict()) == CORRELATION_KEYS

    def test_shipped_default_has_the_registration_keys(self):
        assert sorted(load_file(STN_WEIGHTS)) == sorted(REGISTRATION_KEYS)

    def test_homography_registration_has_the_registration_keys(self):
        # The transform only changes the fit of the matches: no weight of its own.
        assert list(SpatialTransformer(**HOMOGRAPHY_REGISTRATION).state_dict()) == REGISTRATION_KEYS


class TestEmbeddedDefault:
    @pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
    def test_stn_loads_every_shipped_tensor(self, low_cpu_mem_usage):
        stn, info = SpatialTransformer.from_pretrained(
            DEFAULT_PIPELINE_DIR / "stn", output_loading_info=True, low_cpu_mem_usage=low_cpu_mem_usage
        )
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
        shipped = load_file(STN_WEIGHTS)
        for name, tensor in stn.state_dict().items():
            torch.testing.assert_close(tensor, shipped[name].to(tensor.dtype), rtol=0, atol=0, msg=name)

    def test_localizer_runs_on_the_loaded_parameters(self):
        # diffusers' default loader builds the model on the meta device and then replaces each
        # parameter by name: the localiser must compute with the replacements, not the placeholders.
        stn = load_default().stn
        assert stn.localizer.localization is stn.localization
        assert {id(p) for p in stn.head_parameters()} <= {id(p) for p in stn.parameters()}
        # trained features, not the zero initialisation of the residual branch's last layer
        assert stn.localization.residual[2].weight.abs().sum() > 0
        sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(stn.predict_theta(sample, sample)).all()

    def test_shipped_weights_start_a_homography_stn(self):
        # from_pretrained's config override: the trained matcher, fitted with 8 dof instead of 6.
        stn, info = SpatialTransformer.from_pretrained(
            DEFAULT_PIPELINE_DIR / "stn", transform="homography", output_loading_info=True
        )
        assert stn.config.transform == "homography"
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
        shipped = load_file(STN_WEIGHTS)
        for name, tensor in stn.state_dict().items():
            torch.testing.assert_close(tensor, shipped[name].to(tensor.dtype), rtol=0, atol=0, msg=name)
        sample = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            theta = stn.predict_theta(sample, sample)
        assert theta.shape == (1, 3, 3) and torch.isfinite(theta).all()

    def test_default_loads_safetensors_only(self, tmp_path, monkeypatch):
        folder = tmp_path / "default"
        shutil.copytree(DEFAULT_PIPELINE_DIR, folder)
        weights = folder / "stn" / "diffusion_pytorch_model.safetensors"
        torch.save(load_file(weights), weights.with_suffix(".bin"))  # a pickle where the safetensors was
        weights.unlink()
        monkeypatch.setitem(stn_diffusers.default.EMBEDDED_PIPELINES, "fast", folder)
        with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors"):
            load_default()

    def test_both_embedded_pipelines_load_with_their_own_vae(self):
        from diffusers import AutoencoderKL, AutoencoderTiny

        from stn_diffusers.pipelines.pipeline_stn_alignment import vae_fingerprint

        fast, accurate = load_default(), load_default(variant="accurate")
        assert isinstance(fast.vae, AutoencoderTiny) and isinstance(accurate.vae, AutoencoderKL)
        for pipe in (fast, accurate):
            assert pipe.stn.config.architecture == "search_refine"
            assert pipe.stn.config.vae_fingerprint == vae_fingerprint(pipe.vae)
        encoder_size = lambda pipe: sum(p.numel() for p in pipe.vae.encoder.parameters())  # noqa: E731
        assert encoder_size(fast) * 10 < encoder_size(accurate)  # what makes the default fast

    def test_an_unknown_variant_names_the_known_ones(self):
        with pytest.raises(ValueError, match=r"expected variant in \('fast', 'accurate'\), got 'tiny'"):
            load_default(variant="tiny")

    def test_loads_without_a_word_on_stderr_or_a_warning(self, capfd, recwarn):
        from diffusers.utils import logging as diffusers_logging

        capfd.readouterr()
        load_default()
        assert capfd.readouterr().err == ""
        assert [str(w.message) for w in recwarn] == []
        # The loading bar is silenced for this load only: the caller's own pipelines keep theirs.
        assert diffusers_logging.is_progress_bar_enabled()

    def test_package_data_ships_every_weights_file(self):
        config = configparser.ConfigParser()
        config.read(REPO_ROOT / "setup.cfg")
        # setuptools reads the list one pattern a line or comma-separated.
        patterns = re.split(r"[,\s]+", config["options.package_data"]["stn_diffusers"].strip())
        package = REPO_ROOT / "stn_diffusers"
        shipped = {path for pattern in patterns for path in package.glob(pattern)}
        for folder in EMBEDDED_PIPELINES.values():
            weights = {path for path in folder.rglob("*") if path.is_file()}
            assert folder.parent == package / "weights"
            assert weights and weights <= shipped


class TestSavedWeights:
    @pytest.mark.parametrize("low_cpu_mem_usage", [True, False])
    @pytest.mark.parametrize(
        "config",
        [STN_PRESETS["seed"], STN_PRESETS["registration"], HOMOGRAPHY_REGISTRATION, STN_PRESETS["correlation"]],
        ids=["seed", "registration", "homography", "correlation"],
    )
    def test_save_pretrained_reloads_equal_tensors(self, tmp_path, config, low_cpu_mem_usage):
        model = perturbed(SpatialTransformer(**config))
        model.save_pretrained(tmp_path)
        loaded = SpatialTransformer.from_pretrained(tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
        assert list(loaded.state_dict()) == list(model.state_dict())
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
        # The localiser computes with the very parameters that were loaded.
        loaded_ids = {name: id(p) for name, p in loaded.named_parameters()}
        assert {name: id(p) for name, p in loaded.localizer.named_parameters()} == loaded_ids

    def test_deepcopy_gives_the_copy_its_own_localizer(self):
        model = SpatialTransformer(**STN_PRESETS["correlation"])
        clone = copy.deepcopy(model)
        with torch.no_grad():
            clone.residual_gate.fill_(1.0)
        assert clone.localizer.residual_gate is clone.residual_gate
        assert model.residual_gate.abs().sum() == 0 and model.localizer.residual_gate is model.residual_gate

    def test_assigned_parameters_reach_the_localizer(self):
        model = SpatialTransformer(**STN_PRESETS["correlation"])
        state = {name: tensor.clone() for name, tensor in perturbed(copy.deepcopy(model)).state_dict().items()}
        model.load_state_dict(state, assign=True)  # replaces the parameter objects
        assert model.localizer.log_match_scale is model.log_match_scale
        torch.testing.assert_close(model.head_parameters()[1], state["log_match_scale"], rtol=0, atol=0)


def test_cli_loads_an_embedded_pipeline_by_name_unless_a_folder_has_that_name(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from stn_diffusers.cli import load_pipeline

    assert isinstance(load_pipeline("accurate").vae, AutoencoderKL)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "accurate").mkdir()  # a folder of that name is what the user means
    with pytest.raises(FileNotFoundError, match="got 'accurate', which has no model_index.json"):
        load_pipeline("accurate")
