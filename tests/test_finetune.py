"""Fine-tuning: real photos from scikit-image, a tiny local VAE, a few steps at 128×128 (or 64×64
with a smaller STN where a test needs dozens of steps)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import PIL.Image
import pytest
import skimage.data
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline, checkpoints, data, finetune, geometry, losses

from .conftest import TINY_REGISTRATION, make_tiny_vae

REPO_ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 128
# A registration STN that matches at stride 2 only, so it takes latents from 4×4 up: runs of 64×64
# crops with it take a few tens of milliseconds a step.
SMALL_REGISTRATION = {
    **TINY_REGISTRATION,
    "feature_channels": (8, 16), "iteration_strides": (2,), "search_radius": (2,), "num_iterations": 2,
}  # fmt: skip
SMALL_STEPS = 40


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Photos (RGB of three sizes), a tiny VAE saved to disk and a tiny registration config."""
    root = tmp_path_factory.mktemp("finetune")
    photos = root / "photos"
    (photos / "nested").mkdir(parents=True)
    PIL.Image.fromarray(skimage.data.astronaut()).save(photos / "astronaut.jpg")
    PIL.Image.fromarray(skimage.data.coffee()).save(photos / "coffee.png")
    PIL.Image.fromarray(skimage.data.chelsea()).save(photos / "nested" / "chelsea.jpg")
    make_tiny_vae().save_pretrained(root / "vae")
    (root / "stn.json").write_text(json.dumps(TINY_REGISTRATION))
    (root / "stn_small.json").write_text(json.dumps(SMALL_REGISTRATION))
    return root


def train_argv(workspace: Path, output_dir: Path, *extra: str, data_dir: Path | None = None) -> list[str]:
    return [
        "--pretrained_vae_name_or_path", str(workspace / "vae"),
        "--train_data_dir", str(data_dir or workspace / "photos"),
        "--output_dir", str(output_dir),
        "--stn_config", str(workspace / "stn.json"),
        "--resolution", str(RESOLUTION),
        "--train_batch_size", "4",
        "--max_train_steps", "4",
        "--pairs_per_image", "2",
        "--lr_warmup_steps", "1",
        "--checkpointing_steps", "2",
        "--validation_steps", "2",
        "--num_validation_pairs", "4",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


def small_argv(workspace: Path, output_dir: Path, *extra: str) -> list[str]:
    """SMALL_STEPS steps of 64×64 crops with the small STN, a checkpoint every 2 steps (the newest 2
    kept), the loss of every step in metrics.jsonl, validation at the end only."""
    return train_argv(
        workspace, output_dir, "--stn_config", str(workspace / "stn_small.json"), "--resolution", "64",
        "--train_batch_size", "2", "--max_train_steps", str(SMALL_STEPS), "--checkpoints_total_limit", "2",
        "--logging_steps", "1", "--validation_steps", "1000", "--num_validation_pairs", "2", *extra,
    )  # fmt: skip


def run(argv: list[str]) -> Path:
    return finetune.main(finetune.parse_args(argv))


def stn_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "stn" / "diffusion_pytorch_model.safetensors")


def assert_bit_identical(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differing, f"{len(differing)} of {len(first)} tensors differ, e.g. {differing[:3]}"


def read_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / finetune.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory) -> Path:
    """The small run, uninterrupted, in this process on one thread like the subprocesses below
    (``OMP_NUM_THREADS=1``): the same float operations in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(small_argv(workspace, tmp_path_factory.mktemp("uninterrupted") / "out"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}


class TestFinetune:
    def test_output_loads_as_a_pipeline_and_the_vae_is_untouched(self, workspace, tmp_path):
        output = run(train_argv(workspace, tmp_path / "out"))

        pipe = STNAlignmentPipeline.from_pretrained(output)
        given = AutoencoderKL.from_pretrained(workspace / "vae")
        saved, original = pipe.vae.state_dict(), given.state_dict()
        assert saved.keys() == original.keys()
        assert all(torch.equal(saved[name], original[name]) for name in original)
        assert isinstance(pipe.stn, SpatialTransformer) and pipe.stn.config.architecture == "correlation"
        assert pipe.stn.config.vae_fingerprint is not None
        # The residual gates start at 0 (identity); training must have moved them.
        assert pipe.stn.residual_gate.abs().sum() > 0

        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "val_corner_error" in r] == [2, 4]
        assert all(r["loss"] >= 0 for r in records if "loss" in r)
        saved = checkpoints.list_checkpoints(output / finetune.CHECKPOINTS_DIR)
        assert [p.name for p in saved] == ["checkpoint-2", "checkpoint-4"]
        card = (output / "README.md").read_text()
        assert "validation" in card.lower() and "--resolution" not in card and '"resolution": 128' in card

    def test_resume_from_latest_reproduces_the_uninterrupted_run(self, workspace, tmp_path):
        uninterrupted = run(train_argv(workspace, tmp_path / "full"))

        # A run killed after checkpoint-2: its folder holds that checkpoint, a half-written later
        # one (which `latest` must ignore), and the metrics it had logged.
        interrupted = tmp_path / "interrupted"
        shutil.copytree(uninterrupted / "checkpoints" / "checkpoint-2", interrupted / "checkpoints" / "checkpoint-2")
        (interrupted / "checkpoints" / ".partial-checkpoint-4").mkdir()
        shutil.copytree(uninterrupted / "latent_cache", interrupted / "latent_cache")
        lines = (uninterrupted / "metrics.jsonl").read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= 2]
        (interrupted / "metrics.jsonl").write_text("\n".join(kept) + "\n")
        assert checkpoints.resolve_checkpoint(interrupted / "checkpoints", "latest").name == "checkpoint-2"

        resumed = run(train_argv(workspace, interrupted, "--resume_from_checkpoint", "latest"))

        full_stn = STNAlignmentPipeline.from_pretrained(uninterrupted).stn.state_dict()
        resumed_stn = STNAlignmentPipeline.from_pretrained(resumed).stn.state_dict()
        assert all(torch.allclose(full_stn[k], resumed_stn[k], atol=1e-6) for k in full_stn)
        steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 4 and steps == sorted(steps)
        saved = checkpoints.list_checkpoints(resumed / finetune.CHECKPOINTS_DIR)
        assert [p.name for p in saved] == ["checkpoint-2", "checkpoint-4"]

    def test_two_processes_with_torchrun_on_cpu(self, workspace, tmp_path):
        output = tmp_path / "ddp"
        # --standalone: a free port on this machine, so that runs side by side never collide.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += ["-m", "stn_diffusers.finetune", *train_argv(workspace, output, "--train_batch_size", "2")]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Num processes: 2" in result.stderr
        pipe = STNAlignmentPipeline.from_pretrained(output)
        assert pipe.stn.residual_gate.abs().sum() > 0
        # Every process saved its own random state in the checkpoint.
        assert sorted(p.name for p in (output / "checkpoints" / "checkpoint-4").glob("random_states_*")) == [
            "random_states_0.pkl",
            "random_states_1.pkl",
        ]

    def test_unreadable_files_are_skipped_and_named_in_one_warning(self, workspace, tmp_path, caplog):
        folder = tmp_path / "mixed"
        folder.mkdir()
        PIL.Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.jpg")
        PIL.Image.fromarray(skimage.data.camera()).save(folder / "gray.png")  # mode L
        PIL.Image.fromarray(skimage.data.astronaut()).convert("RGBA").save(folder / "alpha.png")
        jpeg = (folder / "astronaut.jpg").read_bytes()
        (folder / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) // 3])
        (folder / "notes.png").write_text("not an image")

        with caplog.at_level(logging.WARNING, logger="stn_diffusers.data"):
            output = run(train_argv(workspace, tmp_path / "out", "--max_train_steps", "2", data_dir=folder))
        warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
        # The folder is read once: validation pairs come from the same photos, not from a second read.
        assert len(warnings) == 1
        assert "corrupt.jpg" in warnings[0] and "notes.png" in warnings[0] and "2 unreadable" in warnings[0]
        assert "3 training photos" in (output / "README.md").read_text()

        with pytest.raises(ValueError, match="corrupt.jpg|notes.png"):
            run(train_argv(workspace, tmp_path / "strict", "--strict", data_dir=folder))

    def test_missing_and_empty_folders_fail_before_training(self, workspace, tmp_path):
        with pytest.raises(FileNotFoundError, match="expected a folder of images"):
            run(train_argv(workspace, tmp_path / "out", data_dir=tmp_path / "missing"))
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="expected image files"):
            run(train_argv(workspace, tmp_path / "out", data_dir=tmp_path / "empty"))

    def test_seed_design_needs_a_vae_with_4_latent_channels(self, workspace, tmp_path):
        vae = AutoencoderKL(
            block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8, norm_num_groups=8,
        )  # fmt: skip
        vae.save_pretrained(tmp_path / "vae8")
        argv = train_argv(workspace, tmp_path / "out", "--stn_config", "seed", "--resolution", "512")
        argv[argv.index("--pretrained_vae_name_or_path") + 1] = str(tmp_path / "vae8")
        with pytest.raises(ValueError, match="4 latent channels"):
            run(argv)
        assert not (tmp_path / "out" / "latent_cache").exists()  # failed before encoding anything

    def test_bad_flags(self, workspace, tmp_path):
        with pytest.raises(ValueError, match="multiple of 8"):
            run(train_argv(workspace, tmp_path / "out", "--resolution", "100"))
        with pytest.raises(ValueError, match="loss weights"):
            finetune.parse_args(train_argv(workspace, tmp_path, "--corner_loss_weight", "0"))
        with pytest.raises(ValueError, match="stn_config"):
            run(train_argv(workspace, tmp_path / "out", "--stn_config", "no-such-preset"))


class TestReproducibility:
    def test_the_same_command_twice_gives_bit_identical_stn_weights(
        self, workspace, uninterrupted, tmp_path, one_thread
    ):
        again = run(small_argv(workspace, tmp_path / "out"))
        assert_bit_identical(stn_weights(uninterrupted), stn_weights(again))

    def test_a_killed_and_resumed_run_ends_with_the_uninterrupted_weights(
        self, workspace, uninterrupted, tmp_path, one_thread
    ):
        output = tmp_path / "killed"
        command = [sys.executable, "-m", "stn_diffusers.finetune", *small_argv(workspace, output)]
        log = tmp_path / "killed.log"
        with log.open("w") as handle:
            process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=tmp_path
            )
            deadline = time.monotonic() + 300
            # A checkpoint-N folder only ever appears complete (renamed from its partial write).
            while not checkpoints.list_checkpoints(output / "checkpoints"):
                assert process.poll() is None, f"the run ended before its first checkpoint: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL
        assert not (output / "model_index.json").exists(), "killed too late: the run had finished"

        run(small_argv(workspace, output, "--resume_from_checkpoint", "latest"))
        summary = json.loads((output / finetune.SUMMARY_FILE).read_text())
        assert 0 < summary["resumed_from_step"] < SMALL_STEPS
        assert_bit_identical(stn_weights(uninterrupted), stn_weights(output))
        # Every step's loss is logged once, as in the uninterrupted run (a line cut by the kill is dropped).
        assert read_records(output) == read_records(uninterrupted)


class FakeAccelerator:
    """What ``save_checkpoint`` asks of an ``Accelerator``: one process whose state is two small files."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, output_dir: str) -> None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"weights")
        (Path(output_dir) / "optimizer.bin").write_bytes(b"moments")


class Killed(Exception):
    """Stands for a kill at one point of a checkpoint write."""


class TestCheckpoints:
    def save(self, folder: Path, step: int, total_limit: int | None = None) -> Path:
        return checkpoints.save_checkpoint(FakeAccelerator(), folder, step, total_limit)

    def names(self, folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir())

    def test_a_crash_before_the_new_checkpoint_is_renamed_leaves_the_old_one(self, tmp_path, monkeypatch):
        self.save(tmp_path, 2, total_limit=1)
        rename = os.replace

        def crash_on_the_final_rename(source, target):
            if Path(source).name == f"{checkpoints.PARTIAL_PREFIX}{checkpoints.CHECKPOINT_PREFIX}4":
                raise Killed
            rename(source, target)

        monkeypatch.setattr(checkpoints.os, "replace", crash_on_the_final_rename)
        with pytest.raises(Killed):
            self.save(tmp_path, 4, total_limit=1)
        assert checkpoints.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"

    def test_a_crash_while_deleting_the_old_checkpoint_leaves_the_new_one(self, tmp_path, monkeypatch):
        self.save(tmp_path, 2, total_limit=1)
        delete = shutil.rmtree

        def crash_on_the_old_checkpoint(path, *args, **kwargs):
            if Path(path).name.endswith(f"{checkpoints.CHECKPOINT_PREFIX}2"):
                raise Killed
            delete(path, *args, **kwargs)

        monkeypatch.setattr(checkpoints.shutil, "rmtree", crash_on_the_old_checkpoint)
        with pytest.raises(Killed):
            self.save(tmp_path, 4, total_limit=1)
        # The half-deleted folder no longer has a checkpoint's name.
        assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-4"]
        assert checkpoints.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-4"

    def test_rotation_keeps_the_newest_and_clears_partial_writes(self, tmp_path):
        (tmp_path / f"{checkpoints.PARTIAL_PREFIX}checkpoint-3").mkdir()  # a write cut short earlier
        for step in (2, 4, 6):
            self.save(tmp_path, step, total_limit=2)
        assert self.names(tmp_path) == ["checkpoint-4", "checkpoint-6"]
        assert all(checkpoints.is_complete(p) for p in checkpoints.list_checkpoints(tmp_path))

    def test_latest_skips_incomplete_checkpoints_and_fails_when_none_is_complete(self, tmp_path):
        assert checkpoints.resolve_checkpoint(tmp_path / "none-yet", "latest") is None
        self.save(tmp_path, 2)
        self.save(tmp_path, 4)
        (tmp_path / "checkpoint-4" / "optimizer.bin").write_bytes(b"cut")  # not the size in the manifest
        assert checkpoints.resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
        with pytest.raises(ValueError, match="expected a complete checkpoint"):
            checkpoints.resolve_checkpoint(tmp_path, tmp_path / "checkpoint-4")
        (tmp_path / "checkpoint-2" / checkpoints.MANIFEST_FILE).unlink()
        with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ".*checkpoint-2, checkpoint-4"):
            checkpoints.resolve_checkpoint(tmp_path, "latest")

    def test_resume_without_a_complete_checkpoint_fails_before_anything_is_touched(self, workspace, tmp_path):
        output = tmp_path / "out"
        (output / "checkpoints" / f"{checkpoints.PARTIAL_PREFIX}checkpoint-4").mkdir(parents=True)
        metrics = output / finetune.METRICS_FILE
        metrics.write_text('{"step": 2, "loss": 1.5}\n{"step": 4, "loss": 1.2}\n')
        with pytest.raises(ValueError, match=re.escape(str(output / "checkpoints"))):
            run(train_argv(workspace, output, "--resume_from_checkpoint", "latest"))
        assert metrics.read_text() == '{"step": 2, "loss": 1.5}\n{"step": 4, "loss": 1.2}\n'
        assert self.names(output) == ["checkpoints", finetune.METRICS_FILE]


class TestInputErrors:
    def test_each_input_error_is_one_line_and_leaves_no_output_folder(self, workspace, tmp_path, capsys):
        empty, unreadable = tmp_path / "empty", tmp_path / "unreadable"
        empty.mkdir()
        unreadable.mkdir()
        (unreadable / "notes.png").write_text("not an image")
        (unreadable / "cut.jpg").write_bytes(b"\xff\xd8\xff")
        cases = {
            "empty": (["--train_data_dir", str(empty)], "expected image files"),
            "unreadable": (["--train_data_dir", str(unreadable)], "--train_data_dir: expected at least one readable"),
            "heldout": (["--validation_data_dir", str(unreadable)], "--validation_data_dir: expected at least one"),
            "not_a_multiple": (["--resolution", "100"], "multiple of 8 (the VAE's downsampling factor), got 100"),
            "too_small": (["--resolution", "64"], "expected --resolution >= 128 pixels"),
            "seed_design": (["--stn_config", "seed", "--resolution", "256"], "expected --resolution 512"),
        }
        for name, (flags, message) in cases.items():
            output = tmp_path / "runs" / name
            assert finetune.cli(train_argv(workspace, output, *flags)) == 2, name
            errors = capsys.readouterr().err
            assert "Traceback" not in errors, name
            lines = [line for line in errors.splitlines() if line.startswith("error: ")]
            assert len(lines) == 1 and message in lines[0], (name, lines)
            assert not output.exists(), name

    def test_debug_adds_the_traceback(self, workspace, tmp_path, capsys):
        argv = train_argv(workspace, tmp_path / "out", "--resolution", "100", "--debug")
        assert finetune.cli(argv) == 2
        errors = capsys.readouterr().err
        assert "Traceback" in errors and "error: expected --resolution to be a multiple of 8" in errors

    def test_python_dash_m_prints_one_error_line_without_a_traceback(self, workspace, tmp_path):
        (tmp_path / "empty").mkdir()
        command = [sys.executable, "-m", "stn_diffusers.finetune", *train_argv(workspace, tmp_path / "out")]
        command[command.index("--train_data_dir") + 1] = str(tmp_path / "empty")
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=tmp_path
        )
        assert result.returncode == 2, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert [line for line in result.stderr.splitlines() if line.startswith("error: ")] == [
            f"error: --train_data_dir: expected image files ({', '.join(data.IMAGE_EXTENSIONS)}) "
            f"under {str(tmp_path / 'empty')!r}, found none"
        ]
        assert not (tmp_path / "out").exists()


class TestTrainingLoss:
    def batch(self, theta: torch.Tensor) -> dict:
        generator = torch.Generator().manual_seed(0)
        reference = torch.randn(theta.shape[0], 4, 16, 16, generator=generator)
        moving = geometry.warp(reference, geometry.invert_theta(theta))
        return {"moving": moving, "reference": reference, "theta": theta}

    def test_identity_start_has_zero_loss_only_for_zero_motion(self):
        torch.manual_seed(0)
        stn = SpatialTransformer(**TINY_REGISTRATION)
        still, _ = losses.training_loss(stn, self.batch(geometry.identity_theta(2)), RESOLUTION)
        moved = geometry.random_theta(2, "standard", RESOLUTION, RESOLUTION, torch.Generator().manual_seed(1))
        loss, parts = losses.training_loss(stn, self.batch(moved), RESOLUTION, latent_weight=1.0, theta_weight=1.0)
        assert float(still.detach()) == pytest.approx(0.0, abs=1e-5)
        assert parts["corner_error"] > 1.0 and parts["latent_loss"] > 0 and parts["theta_loss"] > 0
        total = parts["corner_loss"] + parts["latent_loss"] + parts["theta_loss"]
        assert parts["loss"] == pytest.approx(total, rel=1e-5)

    def test_gradient_reaches_the_gates_that_start_at_zero(self):
        torch.manual_seed(0)
        stn = SpatialTransformer(**TINY_REGISTRATION)
        moved = geometry.random_theta(2, "standard", RESOLUTION, RESOLUTION, torch.Generator().manual_seed(1))
        loss, _ = losses.training_loss(stn, self.batch(moved), RESOLUTION)
        loss.backward()
        assert stn.residual_gate.grad.abs().sum() > 0

    def test_seed_recipe_trains_the_seed_design_without_a_reference(self):
        stn = SpatialTransformer()
        moved = geometry.random_theta(2, "standard", 512, 512, torch.Generator().manual_seed(1))
        generator = torch.Generator().manual_seed(0)
        reference = torch.randn(2, 4, 64, 64, generator=generator)
        moving = geometry.warp(reference, geometry.invert_theta(moved))
        batch = {"moving": moving, "reference": reference, "theta": moved}
        loss, parts = losses.training_loss(stn, batch, 512, corner_weight=0.0, latent_weight=1.0, theta_weight=1.0)
        loss.backward()
        assert "corner_loss" not in parts and stn.fc_loc[2].bias.grad.abs().sum() > 0


class TestCurriculum:
    def test_ramps_from_the_start_amount_to_the_full_range(self):
        args = finetune.parse_args(["--pretrained_vae_name_or_path", "v", "--train_data_dir", "d", "--output_dir", "o"])
        args.curriculum_start, args.curriculum_steps = 0.2, 100
        amounts = [finetune.curriculum_amount(step, args, 1000) for step in (0, 50, 100, 900)]
        assert amounts == pytest.approx([0.2, 0.6, 1.0, 1.0])
        args.curriculum_steps = 0
        assert finetune.curriculum_amount(0, args, 1000) == 1.0


class TestLatentPairPool:
    @pytest.fixture
    def sources(self) -> list[torch.Tensor]:
        return [torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float() / 255]

    def settings(self, **overrides) -> data.PoolSettings:
        return data.PoolSettings(**{"resolution": RESOLUTION, "pairs_per_image": 3, "min_amount": 0.5, **overrides})

    def views(self, sources: list[torch.Tensor], settings: data.PoolSettings):
        """The ``views_of`` of ``build_latent_pool``: the rendered views of photo ``i``."""
        return lambda i: data.render_views(sources[i], settings, i)

    def test_sampled_theta_aligns_moving_onto_reference(self, sources):
        # With the identity as "encoder" the pool holds pixels, so θ can be checked on the image.
        settings = self.settings()
        keys = ["a.pt"]
        pool = data.build_latent_pool(self.views(sources, settings), keys, settings, lambda x: x)
        batch = pool.sample(6, torch.Generator().manual_seed(0), reference_rate=0.3)
        aligned = geometry.warp(batch["moving"], batch["theta"])
        mask = geometry.valid_mask(batch["theta"], RESOLUTION, RESOLUTION)
        residual = ((aligned - batch["reference"]).abs() * mask).sum() / (mask.sum() * 3)
        motion = ((batch["moving"] - batch["reference"]).abs()).mean()
        assert residual < 0.3 * motion
        moved = geometry.corner_error(batch["theta"], geometry.identity_theta(6), RESOLUTION, RESOLUTION)
        assert (moved > 0.5).all()

    def test_same_generator_same_batch_and_curriculum_limits_warps(self, sources):
        settings = self.settings()
        pool = data.build_latent_pool(self.views(sources, settings), ["a.pt"], settings, lambda x: x)
        first = pool.sample(4, torch.Generator().manual_seed(3))
        second = pool.sample(4, torch.Generator().manual_seed(3))
        assert all(torch.equal(first[k], second[k]) for k in first)
        small = pool.sample(16, torch.Generator().manual_seed(3), amount=0.5, reference_rate=1.0)
        full = data.view_thetas(settings, 0)
        assert torch.allclose(small["theta"], full[1].expand(16, -1, -1))  # only the smallest view is allowed

    def test_cache_is_reused_and_keyed_by_settings(self, sources, tmp_path):
        photo = tmp_path / "astronaut.png"
        PIL.Image.fromarray(skimage.data.astronaut()).save(photo)
        calls = []

        def views_of(i, settings):
            calls.append(i)
            return data.render_views(sources[i], settings, i)

        settings = self.settings()
        keys = [data.cache_key(photo, settings, "vae-a")]
        subsample = lambda x: x[:, :, ::8, ::8]  # noqa: E731
        first = data.build_latent_pool(lambda i: views_of(i, settings), keys, settings, subsample, tmp_path / "cache")
        again = data.build_latent_pool(lambda i: views_of(i, settings), keys, settings, lambda x: x, tmp_path / "cache")
        assert calls == [0] and torch.equal(first.latents[0], again.latents[0])
        assert data.cache_key(photo, self.settings(seed=1), "vae-a") != keys[0]
        assert data.cache_key(photo, settings, "vae-b") != keys[0]
        assert not list((tmp_path / "cache").glob("*.tmp*"))

    def test_latent_space_pool_warps_the_reference_latents(self, sources):
        settings = self.settings(warp_space="latent")
        pool = data.build_latent_pool(self.views(sources, settings), ["a.pt"], settings, lambda x: x)
        assert pool.latents[0].shape[0] == 1  # only the reference crop is encoded
        batch = pool.sample(2, torch.Generator().manual_seed(0))
        expected = geometry.warp(batch["reference"], geometry.invert_theta(batch["theta"]))
        assert torch.allclose(batch["moving"], expected, atol=1e-6)


def test_theta_loss_compares_a_homography_with_an_affine_truth():
    model = SpatialTransformer(
        conditioning="reference", architecture="correlation", transform="homography",
        feature_channels=(8, 8, 8, 8), feature_dim=8, sample_size=16,
    )  # fmt: skip
    true = geometry.identity_theta(2)
    moving = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = {"moving": moving, "reference": moving, "theta": true}
    _, parts = losses.training_loss(model, batch, 128, corner_weight=0.0, theta_weight=1.0)
    # The model starts at the identity: its 3×3 prediction equals the promoted 2×3 truth.
    assert parts["theta_loss"] == pytest.approx(0.0, abs=1e-10)
    shifted = true.clone()
    shifted[:, 0, 2] = 0.1
    _, parts = losses.training_loss(model, {**batch, "theta": shifted}, 128, corner_weight=0.0, theta_weight=1.0)
    assert parts["theta_loss"] == pytest.approx(0.1**2 / 9, rel=1e-4)  # one entry of nine is off by 0.1


def test_a_non_finite_gradient_is_recognised_so_its_update_is_skipped():
    from stn_diffusers.finetune import _gradients_finite

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    assert _gradients_finite(model)
    model[1].weight.grad[0, 0] = float("nan")
    assert not _gradients_finite(model)
    model[1].weight.grad = None  # parameters without a gradient do not count
    assert _gradients_finite(model)
