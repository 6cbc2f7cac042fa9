"""Training steps per second from the latent cache vs encoding every pair at every step.

Both runs use the same photos, settings, seed and number of steps; only ``--cache_latents`` differs.
The cached run's one-off encoding time is reported separately (it is paid once per dataset and
settings, and reused by later runs that share ``--cache_dir``)::

    OMP_NUM_THREADS=1 python benchmarks/finetune_speed.py --vae data/default_vae \\
        --train_data_dir data/photos/train --validation_data_dir data/photos/heldout --steps 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from stn_diffusers import finetune
from stn_diffusers.metrics import markdown_table


def run(
    vae: str, train: str, validation: str, output: Path, steps: int, batch_size: int, cache: bool, extra: list[str]
) -> dict:
    argv = [
        "--pretrained_vae_name_or_path", vae, "--train_data_dir", train, "--validation_data_dir", validation,
        "--output_dir", str(output), "--max_train_steps", str(steps), "--train_batch_size", str(batch_size),
        "--validation_steps", str(10 * steps), "--checkpointing_steps", str(10 * steps), "--num_validation_pairs", "4",
        "--report_to", "none", "--cache_latents" if cache else "--no-cache_latents", *extra,
    ]  # fmt: skip
    finetune.main(finetune.parse_args(argv))
    return json.loads((output / finetune.SUMMARY_FILE).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="data/default_vae")
    parser.add_argument("--train_data_dir", default="data/photos/train")
    parser.add_argument("--validation_data_dir", default="data/photos/heldout")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="More finetune flags for both runs.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for name, cache in (("encode every step", False), ("latent cache", True)):
            summary = run(args.vae, args.train_data_dir, args.validation_data_dir, Path(tmp) / name.replace(" ", "_"),
                          args.steps, args.batch_size, cache, args.extra)  # fmt: skip
            rows[name] = summary
    table = []
    for name, summary in rows.items():
        rate = summary["global_step"] / summary["train_seconds"]
        seconds = [f"{summary['cache_seconds']:.1f}", f"{summary['train_seconds']:.1f}"]
        table.append([name, summary["global_step"], args.batch_size, *seconds, f"{rate:.3f}"])
    print(markdown_table(("mode", "steps", "batch", "one-off encoding (s)", "training (s)", "steps/s"), table))
    cached, uncached = rows["latent cache"], rows["encode every step"]
    speedup = (cached["global_step"] / cached["train_seconds"]) / (uncached["global_step"] / uncached["train_seconds"])
    print(f"\nspeed-up of the training loop from the cache: {speedup:.1f}×")


if __name__ == "__main__":
    main()
