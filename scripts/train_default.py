"""Re-create the embedded default pipeline shipped in ``stn_diffusers/weights/default/``.

Three stages, seeded, on a 2-core CPU (about an hour in all; each stage's time is printed)::

    python scripts/fetch_photos.py --output data/photos      # photos from packages (once)
    python scripts/train_default.py                          # VAE, then STN, then export

1. ``scripts/train_vae.py`` trains a small ``AutoencoderKL`` with Stable Diffusion's latent layout
   (8× downsampling, 4 latent channels, ``scaling_factor`` set from the data) → ``data/default_vae``.
2. ``stn_diffusers.finetune`` trains the registration STN on top of that frozen VAE
   → ``data/default_stn_run`` (a saved pipeline, checkpoints, ``metrics.jsonl``).
3. Export: the pipeline is stored in fp16 safetensors in ``stn_diffusers/weights/default/``, where
   ``stn_diffusers.load_default()`` finds it. The STN's config records the VAE's fingerprint.

``--skip_vae`` / ``--skip_stn`` reuse an existing stage's output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stn_diffusers import STNAlignmentPipeline  # noqa: E402
from stn_diffusers.default import DEFAULT_PIPELINE_DIR  # noqa: E402

# The settings the shipped weights were trained with. Both stages use the machine's two cores; the
# VAE trains to a wall-time budget (its cosine schedule ends there), so its step count depends on the
# machine's speed.
VAE_FLAGS: list[str] = [
    "--block_out_channels", "32", "64", "64", "96",
    "--layers_per_block", "1",
    "--norm_num_groups", "1",
    "--initial_posterior_logvar", "-6",
    "--resolution", "64",
    "--train_scales", "512", "768", "1024",
    "--train_batch_size", "8",
    "--max_train_steps", "20000",
    "--max_train_minutes", "32",
    "--learning_rate", "3e-4",
    "--lr_warmup_steps", "100",
    "--kl_weight", "1e-6",
    "--mixed_precision", "bf16",
    "--num_threads", "2",
    "--seed", "0",
]  # fmt: skip
STN_FLAGS: list[str] = [
    "--stn_config", "registration",
    "--resolution", "512",
    "--train_batch_size", "16",
    "--max_train_steps", "800",
    "--warp_space", "pixel",
    "--warp_preset", "large",
    "--pairs_per_image", "6",
    "--photometric", "realistic",
    "--corner_loss", "log",
    "--learning_rate", "2e-3",
    "--head_lr_multiplier", "1",
    "--lr_warmup_steps", "50",
    "--validation_steps", "100",
    "--num_validation_pairs", "24",
    "--checkpointing_steps", "100",
    "--checkpoints_total_limit", "2",
    "--seed", "0",
]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default="data/photos", help="folder with train/ and heldout/ photos")
    parser.add_argument("--vae_dir", default="data/default_vae")
    parser.add_argument("--stn_dir", default="data/default_stn_run")
    parser.add_argument("--export_dir", default=str(DEFAULT_PIPELINE_DIR))
    parser.add_argument("--skip_vae", action="store_true", help="reuse --vae_dir")
    parser.add_argument("--skip_stn", action="store_true", help="reuse --stn_dir")
    return parser.parse_args()


def run(command: list[str]) -> float:
    """Run a stage, stream its output, return its wall time in seconds."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def export(stn_dir: Path, export_dir: Path) -> int:
    """Store the trained pipeline in fp16 safetensors; returns the size in bytes."""
    pipe = STNAlignmentPipeline.from_pretrained(stn_dir, torch_dtype=torch.float16)
    if export_dir.exists():
        shutil.rmtree(export_dir)
    pipe.save_pretrained(export_dir, safe_serialization=True)
    for card in ("README.md",):
        if (stn_dir / card).exists():
            shutil.copy(stn_dir / card, export_dir / card)
    return sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())


def main() -> None:
    args = parse_args()
    photos = Path(args.photos)
    train, heldout = str(photos / "train"), str(photos / "heldout")
    timings = {}
    if not args.skip_vae:
        timings["vae_seconds"] = run(
            [sys.executable, "scripts/train_vae.py", "--train_data_dir", train, "--validation_data_dir", heldout,
             "--output_dir", args.vae_dir, *VAE_FLAGS]
        )  # fmt: skip
    if not args.skip_stn:
        timings["stn_seconds"] = run(
            [sys.executable, "-m", "stn_diffusers.finetune", "--pretrained_vae_name_or_path", args.vae_dir,
             "--train_data_dir", train, "--validation_data_dir", heldout, "--output_dir", args.stn_dir, *STN_FLAGS]
        )  # fmt: skip
    size = export(Path(args.stn_dir), Path(args.export_dir))
    timings["export_megabytes"] = round(size / 2**20, 2)
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
