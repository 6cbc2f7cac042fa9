"""Re-create an embedded pipeline shipped in ``stn_diffusers/weights/``.

Three stages, seeded, on a 2-core CPU (each stage's time is printed)::

    python scripts/fetch_photos.py --output data/photos      # photos from packages (once)
    python scripts/train_default.py                          # the fast default: VAE, then STN, then export
    python scripts/train_default.py --variant accurate       # the accurate one

1. ``scripts/train_vae.py`` trains a small VAE with Stable Diffusion's latent layout (8×
   downsampling, 4 latent channels, ``scaling_factor`` set from the data) → ``data/fast_vae`` (an
   ``AutoencoderTiny`` with a 16-channel encoder, about 42 minutes on one core) or
   ``data/default_vae`` (an ``AutoencoderKL``, 32 minutes on two). The fast one is then fine-tuned
   for latents that warp like the pixels (``--equivariance_weight``, 800 steps on 128-pixel crops,
   about 7 minutes on one core) → ``data/fast_vae_eq``.
2. ``stn_diffusers.finetune`` trains the registration STN on top of that frozen VAE
   → ``data/<variant>_stn_run`` (a saved pipeline, checkpoints, ``metrics.jsonl``).
3. Export: the pipeline is stored in fp16 safetensors in ``stn_diffusers/weights/default/`` (fast)
   or ``stn_diffusers/weights/accurate/``, where ``stn_diffusers.load_default(variant=...)`` finds
   it. The STN's config records the VAE's fingerprint.

``--skip_vae`` / ``--skip_equivariance`` / ``--skip_stn`` reuse an existing stage's output;
``--vae_dir`` / ``--equivariance_dir`` point at it. The first stage of the shipped fast default is kept
in ``benchmarks/candidates/fast_vae`` (fp16), so the rest re-creates the shipped weights from it::

    python scripts/train_default.py --skip_vae --vae_dir benchmarks/candidates/fast_vae
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
from stn_diffusers.default import EMBEDDED_PIPELINES  # noqa: E402

# The settings the shipped weights were trained with. Both stages use the machine's two cores; the
# VAE trains to a wall-time budget (its cosine schedule ends there), so its step count depends on the
# machine's speed.
ACCURATE_VAE_FLAGS: list[str] = [
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
# The fast default's VAE: encoder 16 channels × (0, 0, 2, 3) blocks, decoder 48 × (3, 3, 3, 1), one thread.
FAST_VAE_FLAGS: list[str] = [
    "--vae_type", "autoencoder_tiny",
    "--encoder_block_out_channels", "16", "16", "16", "16",
    "--num_encoder_blocks", "0", "0", "2", "3",
    "--decoder_block_out_channels", "48", "48", "48", "48",
    "--num_decoder_blocks", "3", "3", "3", "1",
    "--resolution", "64",
    "--train_scales", "512", "768", "1024",
    "--train_batch_size", "8",
    "--max_train_steps", "8500",
    "--learning_rate", "1e-3",
    "--lr_warmup_steps", "100",
    "--mixed_precision", "bf16",
    "--num_threads", "1",
    "--seed", "0",
    "--checkpointing_steps", "500",
]  # fmt: skip
# Then the fast VAE is fine-tuned for latents that warp like the pixels (held-out PSNR 24.2 → 26.4 dB
# as well: the 128-pixel crops help the decoder). See benchmarks/RESULTS.md, "Latents that warp like the pixels".
FAST_EQUIVARIANCE_FLAGS: list[str] = [
    "--vae_type", "autoencoder_tiny",
    "--resolution", "128",
    "--train_scales", "512", "768", "1024",
    "--train_batch_size", "8",
    "--max_train_steps", "800",
    "--learning_rate", "2e-4",
    "--lr_warmup_steps", "50",
    "--equivariance_weight", "1.0",
    "--equivariance_warp", "large",
    "--mixed_precision", "bf16",
    "--num_threads", "1",
    "--seed", "0",
    "--validation_steps", "200",
]  # fmt: skip
VARIANTS = {
    "fast": {
        "vae_flags": FAST_VAE_FLAGS,
        "vae_dir": "data/fast_vae",
        "equivariance_flags": FAST_EQUIVARIANCE_FLAGS,
        "equivariance_dir": "data/fast_vae_eq",
    },
    "accurate": {"vae_flags": ACCURATE_VAE_FLAGS, "vae_dir": "data/default_vae"},
}
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
    parser.add_argument("--variant", default="fast", choices=tuple(VARIANTS), help="which embedded pipeline")
    parser.add_argument("--vae_dir", default=None, help="default: data/fast_vae or data/default_vae")
    parser.add_argument("--stn_dir", default=None, help="default: data/<variant>_stn_run")
    parser.add_argument("--export_dir", default=None, help="default: the variant's folder in stn_diffusers/weights")
    parser.add_argument("--equivariance_dir", default=None, help="default: data/fast_vae_eq (fast variant only)")
    parser.add_argument("--skip_vae", action="store_true", help="reuse --vae_dir")
    parser.add_argument("--skip_equivariance", action="store_true", help="reuse --equivariance_dir")
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
    # AutoencoderTiny registers `block_out_channels` for itself when built, then saves it and warns
    # about it on every load as an unexpected argument: the shipped config leaves it out.
    vae_config_path = export_dir / "vae" / "config.json"
    vae_config = json.loads(vae_config_path.read_text())
    if vae_config.get("_class_name") == "AutoencoderTiny" and vae_config.pop("block_out_channels", None):
        vae_config_path.write_text(json.dumps(vae_config, indent=2, sort_keys=True) + "\n")
    for card in ("README.md",):
        if (stn_dir / card).exists():
            shutil.copy(stn_dir / card, export_dir / card)
    return sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())


def main() -> None:
    args = parse_args()
    variant = VARIANTS[args.variant]
    args.vae_dir = args.vae_dir or variant["vae_dir"]
    args.stn_dir = args.stn_dir or f"data/{args.variant}_stn_run"
    args.export_dir = args.export_dir or str(EMBEDDED_PIPELINES[args.variant])
    photos = Path(args.photos)
    data_flags = ["--train_data_dir", str(photos / "train"), "--validation_data_dir", str(photos / "heldout")]
    timings = {}
    if not args.skip_vae:
        timings["vae_seconds"] = run(
            [sys.executable, "scripts/train_vae.py", *data_flags, "--output_dir", args.vae_dir, *variant["vae_flags"]]
        )  # fmt: skip
    stn_vae_dir = args.vae_dir
    if "equivariance_flags" in variant:
        stn_vae_dir = args.equivariance_dir or variant["equivariance_dir"]
        if not args.skip_equivariance:
            timings["equivariance_seconds"] = run(
                [sys.executable, "scripts/train_vae.py", "--init_from", args.vae_dir, *data_flags,
                 "--output_dir", stn_vae_dir, *variant["equivariance_flags"]]
            )  # fmt: skip
    if not args.skip_stn:
        timings["stn_seconds"] = run(
            [sys.executable, "-m", "stn_diffusers.finetune", "--pretrained_vae_name_or_path", stn_vae_dir,
             *data_flags, "--output_dir", args.stn_dir, *STN_FLAGS]
        )  # fmt: skip
    size = export(Path(args.stn_dir), Path(args.export_dir))
    timings["export_megabytes"] = round(size / 2**20, 2)
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
