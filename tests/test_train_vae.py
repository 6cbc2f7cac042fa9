"""scripts/train_vae.py: the same --seed gives the same weights, checkpoints are written atomically, and
a resumed run ends where the uninterrupted one does. A tiny AutoencoderKL (8 channels a level) on 32×32
crops of real photos, a few steps in this process."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import PIL.Image
import pytest
import skimage.data
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from stn_diffusers import checkpoints

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_vae.py"
STEPS = 6


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


def run(train_vae, photos: Path, output_dir: Path, *extra: str) -> Path:
    argv = [
        "--train_data_dir", str(photos / "train"), "--validation_data_dir", str(photos / "heldout"),
        "--output_dir", str(output_dir), "--block_out_channels", "8", "8", "8", "8", "--resolution", "32",
        "--train_scales", "64", "--train_batch_size", "2", "--max_train_steps", str(STEPS), "--lr_warmup_steps", "1",
        "--checkpointing_steps", "2", "--log_every", "2", "--validation_steps", "4", "--scaling_crops", "4",
        "--eval_resolution", "64", "--num_threads", "1", *extra,
    ]  # fmt: skip
    train_vae.main(train_vae.parse_args(argv))
    return output_dir


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "diffusion_pytorch_model.safetensors")


def differing(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


class Killed(Exception):
    """Stands for a kill of the training process."""


class TestTrainVae:
    def test_the_same_seed_gives_bit_identical_weights(self, train_vae, photos, tmp_path):
        first = weights(run(train_vae, photos, tmp_path / "first"))
        second = weights(run(train_vae, photos, tmp_path / "second"))
        other_seed = weights(run(train_vae, photos, tmp_path / "other", "--seed", "1"))
        assert differing(first, second) == []
        assert differing(first, other_seed)

    def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_weights(
        self, train_vae, photos, tmp_path, monkeypatch
    ):
        full = run(train_vae, photos, tmp_path / "full")
        save = train_vae.save_checkpoint

        def save_then_stop(accelerator, folder, step, total_limit=None):
            path = save(accelerator, folder, step, total_limit)
            if step == 4:
                raise Killed
            return path

        monkeypatch.setattr(train_vae, "save_checkpoint", save_then_stop)
        with pytest.raises(Killed):
            run(train_vae, photos, tmp_path / "stopped")
        monkeypatch.undo()
        # Only the newest checkpoint is kept, complete, beside no partial write.
        assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["checkpoint-4"]
        assert checkpoints.is_complete(tmp_path / "stopped" / "checkpoint-4")

        resumed = run(train_vae, photos, tmp_path / "stopped", "--resume_from_checkpoint", "latest")
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
