"""Validation corner-error curves of fine-tuning recipes trained side by side.

Every recipe trains for the same number of steps, with the same batch size, on the same photos, and
is validated on the same seeded held-out pairs (pixel-warped, then encoded; ``standard`` warp; corner
error in pixels at ``--resolution``). Recipes are the finetune flags below, so each row can be
reproduced with ``python -m stn_diffusers.finetune``::

    OMP_NUM_THREADS=1 python benchmarks/finetune_compare.py --vae data/default_vae \\
        --recipes registration seed --steps 300 --output_dir runs/compare
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from stn_diffusers import finetune
from stn_diffusers.analysis import read_metrics
from stn_diffusers.metrics import SUMMARY_HEADER, markdown_table, summary_cells

RECIPES: dict[str, list[str]] = {
    # The default preset and flags: correlation cascade, pixel-warped pairs, curriculum, corner loss.
    "registration": [],
    # The same model trained on latent-warped pairs (reference crop encoded once, latents warped).
    "registration-latent": ["--warp_space", "latent"],
    # The seed recipe: the seed design (moving latents only), θ-MSE + latent alignment, Adam 1e-3,
    # a constant learning rate, latent-warped pairs, no curriculum.
    "seed": [
        "--stn_config", "seed", "--warp_space", "latent", "--photometric", "none", "--learning_rate", "1e-3",
        "--head_lr_multiplier", "1", "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--curriculum_steps", "0",
        "--corner_loss_weight", "0", "--theta_loss_weight", "1", "--latent_loss_weight", "1",
    ],  # fmt: skip
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="data/default_vae")
    parser.add_argument("--train_data_dir", default="data/photos/train")
    parser.add_argument("--validation_data_dir", default="data/photos/heldout")
    parser.add_argument("--recipes", nargs="+", default=["registration", "seed"], choices=tuple(RECIPES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--validation_steps", type=int, default=50)
    parser.add_argument("--num_validation_pairs", type=int, default=24)
    parser.add_argument("--output_dir", default="runs/finetune_compare")
    parser.add_argument("--cache_dir", default=None, help="Shared latent cache (default: one per run).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More finetune flags for every recipe.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    curves, finals = {}, {}
    for name in args.recipes:
        output = Path(args.output_dir) / name
        argv = [
            "--pretrained_vae_name_or_path", args.vae, "--train_data_dir", args.train_data_dir,
            "--validation_data_dir", args.validation_data_dir, "--output_dir", str(output),
            "--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch_size),
            "--validation_steps", str(args.validation_steps), "--checkpointing_steps", str(args.steps),
            "--num_validation_pairs", str(args.num_validation_pairs), "--report_to", "none",
            *(["--cache_dir", args.cache_dir] if args.cache_dir else []), *RECIPES[name], *args.extra,
        ]  # fmt: skip
        print(f"## {name}: python -m stn_diffusers.finetune {' '.join(argv)}", flush=True)
        finetune.main(finetune.parse_args(argv))
        records = read_metrics(output / finetune.METRICS_FILE)
        curves[name] = {r["step"]: r["val_corner_error"] for r in records if "val_corner_error" in r}
        finals[name] = json.loads((output / finetune.SUMMARY_FILE).read_text())

    steps = sorted({step for curve in curves.values() for step in curve})
    print("\nValidation mean corner error (px) by step:\n")
    rows = [[step, *(f"{curves[n].get(step, float('nan')):.2f}" for n in args.recipes)] for step in steps]
    print(markdown_table(("step", *args.recipes), rows))
    print("\nFinal held-out figures (corner error in pixels):\n")
    identity = next(iter(finals.values()))["identity"]
    rows = [["identity", *summary_cells(identity), "", ""]]
    for name in args.recipes:
        summary = finals[name]
        times = [f"{summary['train_seconds']:.0f}", f"{summary['cache_seconds']:.0f}"]
        rows.append([name, *summary_cells(summary["final"]), *times])
    print(markdown_table(("recipe", *SUMMARY_HEADER, "training (s)", "encoding (s)"), rows))


if __name__ == "__main__":
    main()
