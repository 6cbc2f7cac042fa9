"""scripts/train_vae.py: the same --seed gives the same weights, checkpoints are written atomically, and
a resumed run ends where the uninterrupted one does, for both VAE types; an AutoencoderTiny's latents
reach the pipeline with the scaling_factor measured on the data. Tiny models (8 channels a level) on
32×32 crops of real photos, a few steps in this process."""

from __future__ import annotations

import importlib.util
import json
import re
import types
from pathlib import Path

import PIL.Image
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from diffusers import AutoencoderTiny
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from safetensors.torch import load_file

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline, checkpoints

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_vae.py"
STEPS = 6
# An AutoencoderTiny as small as the AutoencoderKL the tests train; no block at full resolution, as
# in the fast encoders the script is meant for.
TINY_FLAGS = (
    "--vae_type", "autoencoder_tiny", "--encoder_block_out_channels", "8", "8", "8", "8",
    "--num_encoder_blocks", "0", "1", "1", "1", "--decoder_block_out_channels", "8", "8", "8", "8",
    "--num_decoder_blocks", "1", "1", "1", "1",
)  # fmt: skip
VAE_TYPES = pytest.mark.parametrize("vae_flags", [(), TINY_FLAGS], ids=["autoencoder_kl", "autoencoder_tiny"])


@pytest.fixture(scope="module")
def train_vae():
    spec = importlib.util.spec_from_file_location("train_vae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """The script asks accelerate for bfloat16 autocast on the CPU and sets torch's thread count; accelerate
    keeps one state per process, so it is cleared around each test (as accelerate's own tests do) and the
    thread count restored."""
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae_photos")
    (root / "train").mkdir()
    (root / "heldout").mkdir()
    PIL.Image.fromarray(skimage.data.astronaut()).save(root / "train" / "astronaut.jpg")
    PIL.Image.fromarray(skimage.data.chelsea()).save(root / "train" / "chelsea.png")
    PIL.Image.fromarray(skimage.data.coffee()).save(root / "heldout" / "coffee.jpg")
    return root


def arguments(photos: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--train_data_dir", str(photos / "train"), "--validation_data_dir", str(photos / "heldout"),
        "--output_dir", str(output_dir), "--block_out_channels", "8", "8", "8", "8", "--resolution", "32",
        "--train_scales", "64", "--train_batch_size", "2", "--max_train_steps", str(STEPS), "--lr_warmup_steps", "1",
        "--checkpointing_steps", "2", "--log_every", "2", "--validation_steps", "4", "--scaling_crops", "4",
        "--eval_resolution", "64", "--num_threads", "1", *extra,
    ]  # fmt: skip


def run(train_vae, photos: Path, output_dir: Path, *extra: str) -> Path:
    train_vae.main(train_vae.parse_args(arguments(photos, output_dir, *extra)))
    return output_dir


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "diffusion_pytorch_model.safetensors")


def differing(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


class Killed(Exception):
    """Stands for a kill of the training process."""


class TestTrainVae:
    @VAE_TYPES
    def test_the_same_seed_gives_bit_identical_weights(self, train_vae, photos, tmp_path, vae_flags):
        first = weights(run(train_vae, photos, tmp_path / "first", *vae_flags))
        second = weights(run(train_vae, photos, tmp_path / "second", *vae_flags))
        other_seed = weights(run(train_vae, photos, tmp_path / "other", *vae_flags, "--seed", "1"))
        assert differing(first, second) == []
        assert differing(first, other_seed)

    @VAE_TYPES
    def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
        self, train_vae, photos, tmp_path, monkeypatch, vae_flags
    ):
        full = run(train_vae, photos, tmp_path / "full", *vae_flags)
        save = train_vae.save_checkpoint

        def save_then_stop(accelerator, folder, step, total_limit=None):
            path = save(accelerator, folder, step, total_limit)
            if step == 4:
                raise Killed
            return path

        monkeypatch.setattr(train_vae, "save_checkpoint", save_then_stop)
        with pytest.raises(Killed):
            run(train_vae, photos, tmp_path / "stopped", *vae_flags)
        monkeypatch.undo()
        # Only the newest checkpoint is kept, complete, beside no partial write.
        assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["checkpoint-4"]
        assert checkpoints.is_complete(tmp_path / "stopped" / "checkpoint-4")

        resumed = run(train_vae, photos, tmp_path / "stopped", *vae_flags, "--resume_from_checkpoint", "latest")
        assert differing(weights(full), weights(resumed)) == []
        config, resumed_config = (json.loads((folder / "config.json").read_text()) for folder in (full, resumed))
        assert config["scaling_factor"] == resumed_config["scaling_factor"]
        assert [p.name for p in checkpoints.list_checkpoints(resumed)] == [f"checkpoint-{STEPS}"]

    def test_resume_with_only_a_partial_checkpoint_fails_before_training(self, train_vae, photos, tmp_path):
        output = tmp_path / "out"
        (output / f"{checkpoints.PARTIAL_PREFIX}checkpoint-2").mkdir(parents=True)
        with pytest.raises(ValueError, match=re.escape(str(output)) + ".*partial-checkpoint-2"):
            run(train_vae, photos, output, "--resume_from_checkpoint", "latest")
        assert sorted(p.name for p in output.iterdir()) == [f"{checkpoints.PARTIAL_PREFIX}checkpoint-2"]


class TestAutoencoderTiny:
    def test_trained_model_round_trips_through_the_pipeline_at_the_logged_psnr(self, train_vae, photos, tmp_path):
        output = run(train_vae, photos, tmp_path / "tiny", *TINY_FLAGS)
        log = json.loads((output / "train_log.json").read_text())
        vae = AutoencoderTiny.from_pretrained(output).eval()
        # scaling_factor measured on the data (1 / std of the raw latents), not diffusers' 1.0 for TAESD.
        assert log["model"]["class"] == "AutoencoderTiny"
        assert vae.config.scaling_factor == pytest.approx(1 / log["model"]["latent_std"])
        assert vae.config.scaling_factor != pytest.approx(1.0, abs=1e-3)

        args = train_vae.parse_args(arguments(photos, output, *TINY_FLAGS))
        images, _ = train_vae.load_photos(args.validation_data_dir)
        target = train_vae.to_model_range(train_vae.center_crops(images, args.eval_resolution))  # (1, 3, 64, 64)
        pipe = STNAlignmentPipeline(vae=vae, stn=SpatialTransformer())
        with torch.no_grad():
            latents = pipe.encode(target)  # (1, 4, 8, 8)
            raw = vae.encode(target).latents
            round_trip = pipe.decode(latents)
        torch.testing.assert_close(latents, raw * vae.config.scaling_factor)
        assert latents.shape == (1, 4, args.eval_resolution // 8, args.eval_resolution // 8)
        # The pipeline undoes the scaling before decoding: its round trip scores what training logged.
        assert train_vae.psnr(round_trip, target).item() == pytest.approx(log["heldout"]["psnr_mean"], abs=1e-2)

    def test_zero_initialised_blocks_start_as_their_relu(self, train_vae, photos, tmp_path):
        vae = train_vae.build_vae(train_vae.parse_args(arguments(photos, tmp_path, *TINY_FLAGS)))
        blocks = [module for module in vae.modules() if isinstance(module, AutoencoderTinyBlock)]
        assert len(blocks) == 3 + 4  # encoder (0, 1, 1, 1), decoder (1, 1, 1, 1)
        features = torch.randn(2, 8, 16, 16)
        for block in blocks:
            torch.testing.assert_close(block(features), features.relu())

    def test_unequal_widths_within_the_encoder_are_rejected(self, train_vae, photos, tmp_path):
        flags = list(TINY_FLAGS)
        start = flags.index("--encoder_block_out_channels") + 1
        flags[start : start + 4] = ["8", "16", "16", "16"]
        with pytest.raises(ValueError, match=re.escape("encoder_block_out_channels value at every level") + ".*8, 16"):
            train_vae.parse_args(arguments(photos, tmp_path, *flags))


class TestEquivariance:
    def test_the_loss_is_small_for_an_encoder_that_commutes_with_warps_and_not_for_one_that_does_not(self, train_vae):
        def encoder(offset):
            """An 'encoder' that averages 8×8 cells (it commutes with warps of a smooth picture), plus ``offset``."""
            encode = lambda x: types.SimpleNamespace(latents=F.avg_pool2d(x[:, :1], 8) + offset)  # noqa: E731
            return types.SimpleNamespace(encode=encode)

        smooth = F.interpolate(torch.rand(2, 3, 4, 4) * 2 - 1, size=(64, 64), mode="bicubic", align_corners=False)
        checkerboard = (torch.arange(8).view(8, 1) + torch.arange(8)) % 2 - 0.5  # (8, 8), ±0.5
        losses = {}
        for name, offset in (("commutes", 0.0), ("fixed pattern", checkerboard)):
            vae = encoder(offset)
            generator = torch.Generator().manual_seed(0)
            losses[name] = float(
                train_vae.equivariance_l1(vae, smooth, vae.encode(smooth).latents, generator, "standard")
            )
        # A pattern the encoder adds at fixed cells does not move with the picture.
        assert losses["fixed pattern"] > 5 * losses["commutes"]

    def test_fine_tuning_from_a_saved_vae_with_the_loss_changes_the_weights_and_logs_it(
        self, train_vae, photos, tmp_path
    ):
        base = run(train_vae, photos, tmp_path / "base", *TINY_FLAGS)
        tuned = run(
            train_vae, photos, tmp_path / "tuned", *TINY_FLAGS, "--init_from", str(base),
            "--equivariance_weight", "1.0", "--equivariance_warp", "standard",
        )  # fmt: skip
        assert differing(weights(base), weights(tuned))
        log = json.loads((tuned / "train_log.json").read_text())
        assert log["training"]["final_losses"]["equivariance"] > 0

    def test_a_negative_weight_is_refused(self, train_vae, photos, tmp_path):
        with pytest.raises(ValueError, match="expected --equivariance_weight >= 0, got -1"):
            train_vae.parse_args(arguments(photos, tmp_path, "--equivariance_weight", "-1"))
