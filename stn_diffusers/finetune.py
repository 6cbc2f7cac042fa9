"""Fine-tune a `SpatialTransformer` in the latent space of a frozen VAE.

Turns a folder of photos into a saved :class:`~stn_diffusers.STNAlignmentPipeline`::

    accelerate launch -m stn_diffusers.finetune \\
        --pretrained_vae_name_or_path stabilityai/sd-vae-ft-mse \\
        --train_data_dir photos/train --validation_data_dir photos/heldout \\
        --resolution 512 --train_batch_size 16 --max_train_steps 3000 --output_dir my-aligner

``python -m stn_diffusers.finetune ...`` runs the same on one process, and
``torchrun --nproc_per_node 2 -m stn_diffusers.finetune ...`` on several (CPU workers use gloo).
The photos may come from an image column of a Hugging Face dataset instead of a folder (a folder
written by ``save_to_disk``, an ``imagefolder`` folder or a Hub id; ``pip install "stn-diffusers[datasets]"``)::

    accelerate launch -m stn_diffusers.finetune --pretrained_vae_name_or_path stabilityai/sd-vae-ft-mse \
        --dataset_name my-photos --image_column image --validation_split test --output_dir my-aligner

The VAE is frozen, so every photo is encoded once: a pool of views per photo (the reference crop
and ``--pairs_per_image`` pixel-warped views, or only the crop with ``--warp_space latent``) is cached
under the output folder, keyed by file and settings, and every training pair is drawn from it.
``--seed`` seeds the STN's initial weights and every random number after them (batches come from a
generator seeded by ``(--seed, step)``), so the same command gives the same weights, and a run
killed at any moment and resumed with ``--resume_from_checkpoint latest`` ends with the weights of
the uninterrupted run (bit for bit on a CPU).

The output folder ends as a saved pipeline (``model_index.json``, ``vae/``, ``stn/``) with
``checkpoints/checkpoint-N``, ``metrics.jsonl`` (step, loss, validation corner error) and a model
card ``README.md``. Mistakes in the input (an empty folder, a resolution the models cannot take)
are reported before anything is written. See ``docs/finetune.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from . import data, geometry
from .checkpoints import checkpoint_step, resolve_checkpoint, save_checkpoint
from .errors import run_reporting_errors
from .losses import CORNER_LOSSES, ThetaCascade, training_loss, unwrap_stn
from .metrics import SUMMARY_HEADER, markdown_table, summarize_errors, summary_cells
from .models.spatial_transformer import STN_PRESETS, TRANSFORMS, SpatialTransformer
from .pipelines.pipeline_stn_alignment import STNAlignmentPipeline, vae_fingerprint, vae_scale_factor

logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "training_summary.json"
CACHE_DIR = "latent_cache"
# Images per VAE encode while caching views, and pairs per STN call in validation.
ENCODE_BATCH_SIZE = 8
VALIDATION_BATCH_SIZE = 16


# ------------------------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (diffusers' training-example names wherever one exists)."""
    parser = argparse.ArgumentParser(description="Fine-tune a SpatialTransformer on a frozen VAE.")
    add = parser.add_argument
    # Models
    add("--pretrained_vae_name_or_path", required=True,
        help="VAE hub id or local folder (AutoencoderKL or any diffusers VAE).")
    add("--vae_subfolder", default=None, help="Subfolder of the VAE, e.g. `vae` of a full Stable Diffusion checkpoint.")
    add("--revision", default=None, help="Hub revision of the VAE.")
    add("--stn_config", default="registration", help="`registration` (default), `seed`, or a path to a config.json.")
    add("--transform", default=None, choices=TRANSFORMS,
        help="Replace the config's motion model, e.g. `homography` for viewpoint changes "
        "(with --warp_preset projective).")
    add("--pretrained_stn", default=None, help="Start from these STN weights (a saved stn folder or pipeline folder).")
    # Data
    add("--train_data_dir", default=None, help="Folder of training images (searched recursively); or --dataset_name.")
    add("--dataset_name", default=None,
        help="Hugging Face dataset of training images instead of --train_data_dir: a save_to_disk folder, "
        "an imagefolder folder or a Hub id.")
    add("--dataset_config_name", default=None, help="The dataset's configuration name, where it has several.")
    add("--image_column", default=data.DEFAULT_IMAGE_COLUMN, help="The dataset's column of images.")
    add("--dataset_split", default=data.DEFAULT_SPLIT, help="The dataset's split to train on.")
    add("--validation_data_dir", default=None, help="Folder of held-out images; default: training images, other seeds.")
    add("--validation_split", default=None,
        help="A split of --dataset_name held out for validation (e.g. `test`), instead of --validation_data_dir.")
    add("--resolution", type=int, default=512, help="Side of the square training crops in pixels.")
    add("--strict", action="store_true", help="Fail on an unreadable image instead of skipping it with a warning.")
    add("--warp_space", choices=data.WARP_SPACES, default="pixel",
        help="Warp photos then encode (`pixel`) or warp latents.")
    add("--pairs_per_image", type=int, default=8, help="Pixel-warped views encoded once per photo and reused.")
    add("--photometric", choices=data.PHOTOMETRIC_MODES, default="realistic",
        help="Jitter moving views like a second shot.")
    add("--warp_preset", choices=tuple(geometry.WARP_PRESETS), default="standard", help="Base warp range.")
    add("--max_rotation", type=float, default=None, help="Degrees; overrides the preset.")
    add("--scale_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="Per-axis scale; overrides.")
    add("--anisotropy_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
        help="Aspect change; overrides.")
    add("--max_shear", type=float, default=None, help="Shear factor; overrides the preset.")
    add("--max_translation", type=float, default=None, help="Fraction of the image; overrides the preset.")
    add("--curriculum_start", type=float, default=0.25, help="Warp amount (fraction of the range) at step 0.")
    add("--curriculum_steps", type=int, default=None,
        help="Steps over which the amount ramps to 1 (default: 40%% of training; 0 = off).")
    add("--reference_rate", type=float, default=0.5, help="How often a pixel-space pair's reference is the clean crop.")
    add("--cache_latents", action=argparse.BooleanOptionalAction, default=True,
        help="Encode once (default) or every step.")
    add("--cache_dir", default=None,
        help="Where encoded views are kept (default: <output_dir>/latent_cache); runs may share one.")
    add("--dataloader_num_workers", type=int, default=0,
        help="Workers that load and warp photos while the cache is built.")
    # Losses
    add("--corner_loss_weight", type=float, default=1.0, help="Mean corner error (pixels) against the known transform.")
    add("--corner_loss", choices=CORNER_LOSSES, default="mean",
        help="`mean` corner error, or `log`: the mean of log(1 + error), which missed pairs do not dominate.")
    add("--latent_loss_weight", type=float, default=0.0, help="Masked MSE between aligned and reference latents.")
    add("--theta_loss_weight", type=float, default=0.0, help="MSE between predicted and true θ entries.")
    add("--pixel_loss_weight", type=float, default=0.0,
        help="MSE between decoded aligned and decoded reference latents.")
    # Optimisation
    add("--train_batch_size", type=int, default=16)
    add("--max_train_steps", type=int, default=None, help="Total optimiser steps; overrides --num_train_epochs.")
    add("--num_train_epochs", type=int, default=10, help="An epoch is one pass over photos × views.")
    add("--learning_rate", type=float, default=1e-3)
    add("--head_lr_multiplier", type=float, default=10.0, help="Learning-rate factor for stn.head_parameters().")
    add("--lr_scheduler", default="cosine", help="Any diffusers.optimization.get_scheduler name.")
    add("--lr_warmup_steps", type=int, default=100)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=0.0)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    add("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: accelerate's configuration.")
    add("--seed", type=int, default=0,
        help="Seeds the STN's initial weights and every batch: same command, same weights.")
    # Output, checkpoints, validation
    add("--output_dir", required=True)
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", default=None, help="A checkpoint folder, or `latest` in --output_dir.")
    add("--validation_steps", type=int, default=100)
    add("--num_validation_pairs", type=int, default=24)
    add("--validation_seed", type=int, default=1234)
    add("--logging_steps", type=int, default=10, help="Steps between loss records in metrics.jsonl.")
    add("--report_to", default="tensorboard", help="`tensorboard`, `wandb`, `all` or `none`.")
    add("--logging_dir", default="logs", help="Inside --output_dir.")
    add("--debug", action="store_true", help="Print the traceback of an input error, not only its one-line message.")
    args = parser.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    if (args.train_data_dir is None) == (args.dataset_name is None):
        given = "both" if args.dataset_name is not None else "neither"
        raise ValueError(f"expected --train_data_dir or --dataset_name (one of them), got {given}")
    if args.validation_split is not None and (args.dataset_name is None or args.validation_data_dir is not None):
        raise ValueError("expected --validation_split with --dataset_name and without --validation_data_dir")
    positive = (
        "resolution", "train_batch_size", "gradient_accumulation_steps", "pairs_per_image", "checkpointing_steps",
        "validation_steps", "logging_steps",
    )  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"expected --{name} >= 1, got {getattr(args, name)}")
    # The resolution is checked against the VAE and the STN once they are loaded (`check_resolution`).
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"expected --checkpoints_total_limit >= 1, got {args.checkpoints_total_limit}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"expected --max_train_steps >= 1, got {args.max_train_steps}")
    if not 0.0 <= args.curriculum_start <= 1.0:
        raise ValueError(f"expected --curriculum_start in [0, 1], got {args.curriculum_start}")
    weights = [args.corner_loss_weight, args.latent_loss_weight, args.theta_loss_weight, args.pixel_loss_weight]
    if min(weights) < 0 or sum(weights) == 0:
        raise ValueError(f"expected non-negative loss weights with at least one above 0, got {weights}")


def warp_range_from_args(args: argparse.Namespace) -> geometry.WarpRange:
    """The full warp range: the preset, with any range flag replacing its entry."""
    base = geometry.WARP_PRESETS[args.warp_preset]
    return geometry.WarpRange(
        rotation=base.rotation if args.max_rotation is None else args.max_rotation,
        scale=base.scale if args.scale_range is None else tuple(args.scale_range),
        anisotropy=base.anisotropy if args.anisotropy_range is None else tuple(args.anisotropy_range),
        shear=base.shear if args.max_shear is None else args.max_shear,
        translation=base.translation if args.max_translation is None else args.max_translation,
    )


def curriculum_amount(step: int, args: argparse.Namespace, max_train_steps: int) -> float:
    """Warp amount in ``[curriculum_start, 1]`` at ``step``: a linear ramp, then the full range."""
    ramp = args.curriculum_steps if args.curriculum_steps is not None else int(0.4 * max_train_steps)
    if ramp <= 0:
        return 1.0
    return min(1.0, args.curriculum_start + (1.0 - args.curriculum_start) * step / ramp)


# ----------------------------------------------------------------------------------------- models
def load_vae(name_or_path: str, subfolder: str | None = None, revision: str | None = None):
    """The VAE class named in its ``config.json`` (``AutoencoderKL`` when unnamed), loaded frozen."""
    import diffusers

    root = Path(name_or_path) / (subfolder or "")
    class_name = "AutoencoderKL"
    if (root / "config.json").is_file():
        class_name = json.loads((root / "config.json").read_text()).get("_class_name", class_name)
    vae_class = getattr(diffusers, class_name, None)
    if vae_class is None:
        raise ValueError(f"expected a diffusers VAE class in {str(root / 'config.json')!r}, got {class_name!r}")
    vae = vae_class.from_pretrained(name_or_path, subfolder=subfolder, revision=revision)
    vae.requires_grad_(False)
    return vae.eval()


def check_resolution(resolution: int, stn: SpatialTransformer, factor: int) -> None:
    """Raise ``ValueError`` unless crops of ``resolution`` pixels encode to latents ``stn`` takes.

    The seed design takes exactly ``stn.fixed_sample_size`` latents per side; the registration
    design at least ``stn.min_sample_size`` (two cells at its coarsest matching stride).
    """
    if resolution % factor:
        raise ValueError(
            f"expected --resolution to be a multiple of {factor} (the VAE's downsampling factor), got {resolution}"
        )
    latents = resolution // factor
    if stn.fixed_sample_size is not None and latents != stn.fixed_sample_size:
        size = stn.fixed_sample_size
        raise ValueError(
            f"expected --resolution {size * factor} for the seed STN design (it takes only {size}×{size} latents), "
            f"got {resolution}"
        )
    if latents < stn.min_sample_size:
        size = stn.min_sample_size
        raise ValueError(
            f"expected --resolution >= {size * factor} pixels for this STN (it needs at least {size}×{size} latents, "
            f"the VAE encodes {factor}×{factor} pixels to one), got {resolution}"
        )


def build_stn(args: argparse.Namespace, vae) -> SpatialTransformer:
    """The STN to train, checked against the VAE and ``--resolution`` before any encoding starts."""
    latent_channels = vae.config.latent_channels
    factor = vae_scale_factor(vae)
    if args.pretrained_stn is not None:
        folder = Path(args.pretrained_stn)
        subfolder = "stn" if (folder / "stn" / "config.json").is_file() else None
        # --transform swaps the motion model of trained weights (the search-refine design's features
        # serve an affine and a homography fit alike).
        overrides = {} if args.transform is None else {"transform": args.transform}
        stn = SpatialTransformer.from_pretrained(args.pretrained_stn, subfolder=subfolder, **overrides)
    else:
        if args.stn_config in STN_PRESETS:
            config = dict(STN_PRESETS[args.stn_config])
        elif Path(args.stn_config).is_file():
            config = {k: v for k, v in json.loads(Path(args.stn_config).read_text()).items() if not k.startswith("_")}
        else:
            raise ValueError(
                f"expected --stn_config in {tuple(STN_PRESETS)} or a config.json path, got {args.stn_config!r}"
            )
        config.pop("vae_fingerprint", None)
        if args.transform is not None:
            config["transform"] = args.transform
        if config.get("architecture", "seed") == "seed":
            if latent_channels != 4:
                raise ValueError(
                    "expected a VAE with 4 latent channels for the seed STN design (fixed 4×64×64 input), "
                    f"got latent_channels={latent_channels}"
                )
        else:
            config["in_channels"] = latent_channels
            config["sample_size"] = args.resolution // factor
            if config["architecture"] == "search_refine":
                # Its features start as the latents themselves: at least one feature per latent channel.
                config["feature_dim"] = max(config.get("feature_dim", latent_channels), latent_channels)
        stn = SpatialTransformer(**config)
    if stn.config.in_channels != latent_channels:
        raise ValueError(
            f"expected an STN with in_channels={latent_channels} (the VAE's latent_channels), "
            f"got {stn.config.in_channels}"
        )
    check_resolution(args.resolution, stn, factor)
    stn.register_to_config(vae_fingerprint=vae_fingerprint(vae))
    return stn


# ------------------------------------------------------------------------------------------- data
def load_photos(
    args: argparse.Namespace, validation: bool = False
) -> tuple[list[torch.Tensor], list[str], list] | None:
    """The training photos (``validation=True``: the held-out ones, ``None`` when none are named)
    through :func:`data.load_photos`: ``(3, H, W)`` tensors, a name each, and what the latent cache
    knows each by (:func:`data.cache_key`: its file, or for a dataset's row its pixels). A
    ``ValueError`` (e.g. every file unreadable) names the flag, so the user knows which source to fix."""
    folder, split = args.train_data_dir, args.dataset_split
    flag = "--train_data_dir" if folder is not None else "--dataset_name"
    if validation:
        if args.validation_data_dir is None and args.validation_split is None:
            return None
        folder, split = args.validation_data_dir, args.validation_split
        flag = "--validation_data_dir" if folder is not None else "--validation_split"
    dataset = args.dataset_name if folder is None else None
    try:
        images, names, files = data.load_photos(
            folder, dataset, args.image_column, args.dataset_config_name, split, strict=args.strict
        )
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from error
    return images, names, [image if file is None else file for image, file in zip(images, files)]


def photo_source(args: argparse.Namespace, validation: bool = False) -> str:
    """Where the training (or held-out) photos come from, for the model card."""
    if validation and args.validation_data_dir is not None:
        return f"`{args.validation_data_dir}`"
    if args.dataset_name is None:
        return f"`{args.train_data_dir}`"
    split = args.validation_split if validation and args.validation_split is not None else args.dataset_split
    return f"split `{split}` of the dataset `{args.dataset_name}` (column `{args.image_column}`)"


class _ViewDataset(torch.utils.data.Dataset):
    """Pixel views of photo ``i`` (rendered in data-loader workers while the cache is built)."""

    def __init__(self, sources: list[torch.Tensor], settings: data.PoolSettings, indices: list[int]):
        self.sources, self.settings, self.indices = sources, settings, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor]:
        index = self.indices[position]
        return index, data.render_views(self.sources[index], self.settings, index)


def _encoder(pipe: STNAlignmentPipeline, resolution: int):
    """``(N, 3, S, S)`` in ``[0, 1]`` → scaled latents ``(N, C, h, w)`` float32 on the CPU."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        latents = pipe.encode_images(images, resolution, resolution, batch_size=ENCODE_BATCH_SIZE)
        return latents.float().cpu()

    return encode


def build_training_pool(args, pipe, sources, cache_sources, settings, accelerator) -> data.LatentPairPool:
    """The pool every batch is drawn from: cached encodings (each photo keyed by its entry of
    ``cache_sources``, see :func:`load_photos`), or encode-on-demand without cache."""
    encode = _encoder(pipe, args.resolution)
    thetas = [data.view_thetas(settings, i) for i in range(len(sources))]
    if not args.cache_latents:

        def encode_view(image_index: int, view: int) -> torch.Tensor:
            return encode(data.render_views(sources[image_index], settings, image_index, [view]))[0]

        return data.LatentPairPool(settings, thetas, encode_view=encode_view)

    encoder_id = json.dumps([vae_fingerprint(pipe.vae), str(pipe.vae.dtype)])
    keys = [data.cache_key(source, settings, encoder_id) for source in cache_sources]
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.output_dir) / CACHE_DIR
    shard = (accelerator.process_index, accelerator.num_processes)
    mine = [i for i in range(shard[0], len(keys), shard[1]) if not (cache_dir / keys[i]).exists()]
    # Render views in loader workers ahead of the encoder; the pool builder takes them in order.
    loader = torch.utils.data.DataLoader(
        _ViewDataset(sources, settings, mine), batch_size=None, num_workers=args.dataloader_num_workers
    )
    rendered = iter(loader)

    def views_of(index: int) -> torch.Tensor:
        got, views = next(rendered)
        if got != index:
            raise RuntimeError(f"expected views of photo {index} from the loader, got {got}")
        return views

    bar = tqdm(
        total=len(range(shard[0], len(keys), shard[1])), desc="Encoding views",
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    pool = data.build_latent_pool(
        views_of, keys, settings, encode, cache_dir,
        shard=shard, barrier=accelerator.wait_for_everyone, progress=bar.update,
    )  # fmt: skip
    bar.close()
    return pool


def validation_set(args, pipe, sources: list[torch.Tensor], names: list[str]) -> dict:
    """Fixed, seeded held-out pairs of ``sources``, encoded once: ``{"moving", "reference", "theta"}``."""
    pairs = data.seeded_pairs(
        sources, args.num_validation_pairs, args.resolution, warp="standard", seed=args.validation_seed, names=names
    )
    encode = _encoder(pipe, args.resolution)
    return {
        "moving": encode(torch.stack([p.moving for p in pairs])),
        "reference": encode(torch.stack([p.reference for p in pairs])),
        "theta": torch.stack([p.theta for p in pairs]),
    }


@torch.no_grad()
def validation_corner_error(pipe: STNAlignmentPipeline, pairs: dict, resolution: int) -> torch.Tensor:
    """Corner error in pixels at ``resolution`` of every validation pair with ``pipe.stn``, ``(N,)``,
    measured as at inference (eval mode: a design may decide differently there, e.g. keep aligned pairs)."""
    was_training = pipe.stn.training
    pipe.stn.eval()
    try:
        theta = pipe.predict_theta(pairs["moving"], pairs["reference"], batch_size=VALIDATION_BATCH_SIZE).cpu()
    finally:
        pipe.stn.train(was_training)
    return geometry.corner_error(theta, pairs["theta"], resolution, resolution)


# ---------------------------------------------------------------------------------------- outputs
def _gradients_finite(model: torch.nn.Module) -> bool:
    """Whether every gradient of ``model`` is finite (after the processes' gradients were summed)."""
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run rewrites them), and a last line cut short by a kill."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    # Rewritten beside and renamed over, so that a kill now cannot lose the records kept.
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text("".join(line + "\n" for line in kept))
    os.replace(partial, path)


def model_card(args: argparse.Namespace, stn: SpatialTransformer, summary: dict) -> str:
    """The ``README.md`` of the output folder: what was trained, on what, and how well."""
    settings = {k: v for k, v in sorted(vars(args).items()) if k != "debug"}
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [stn-diffusers, spatial-transformer, image-registration]",
        "---",
        "",
        "# STN alignment pipeline",
        "",
        f"A `SpatialTransformer` ({stn.config.architecture} design, {sum(p.numel() for p in stn.parameters()):,} "
        "parameters) fine-tuned with `stn_diffusers.finetune` in the latent space of the frozen VAE "
        f"`{args.pretrained_vae_name_or_path}`"
        + (f" (subfolder `{args.vae_subfolder}`)" if args.vae_subfolder else "")
        + ".",
        "",
        "```python",
        "from stn_diffusers import STNAlignmentPipeline",
        "pipe = STNAlignmentPipeline.from_pretrained(\"path/to/this/folder\")",
        "out = pipe(moving_image, reference=reference_image)",
        "```",
        "",
        "## Validation",
        "",
        f"Corner error in pixels at {args.resolution}×{args.resolution} on {summary.get('num_validation_pairs')} "
        f"seeded pairs (`standard` warp) from {photo_source(args, validation=True)}:",
        "",
    ]
    rows = [
        [label, *summary_cells(summary[key])]
        for label, key in (("identity (no alignment)", "identity"), ("this STN", "final"))
        if summary.get(key)
    ]
    lines += [
        markdown_table(("", *SUMMARY_HEADER), rows),
        "",
        "## Training",
        "",
        f"{summary.get('num_train_images')} training photos from {photo_source(args)}, "
        f"{summary.get('global_step')} steps, {summary.get('train_seconds', 0):.0f} s of training. Settings:",
        "",
        "```json",
        json.dumps(settings, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace) -> Path:
    """Train, checkpoint, validate and save the pipeline to ``args.output_dir``; returns that folder."""
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    accelerator = Accelerator(
        # Launched workers (torchrun, accelerate launch) on a machine without a GPU join with gloo on the CPU.
        cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logger.info(accelerator.state, main_process_only=False)
    # Every random number of the run follows from --seed: the STN's initial weights drawn below, and
    # then the batches, whose generators are seeded by (seed, step) so that a resumed run retraces them.
    set_seed(args.seed)

    # 1. Check the input before anything is written: the checkpoint to resume from, the models and
    # the resolution they take, readable photos. A user's mistake leaves no output folder behind.
    checkpoints_dir = output_dir / CHECKPOINTS_DIR
    checkpoint = resolve_checkpoint(checkpoints_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint is not None and checkpoint is None:
        logger.info(f"No checkpoint to resume from in {checkpoints_dir}; starting a new run.")
    vae = load_vae(args.pretrained_vae_name_or_path, args.vae_subfolder, args.revision)
    stn = build_stn(args, vae)
    sources, names, cache_sources = load_photos(args)
    # Without held-out photos, other crops and warps of the training photos.
    held_out = (load_photos(args, validation=True) or (sources, names))[:2]
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # 2. Models on the device: the frozen VAE in the weight dtype, the STN in float32 master weights.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if vae.dtype != weight_dtype:
        vae.to(dtype=weight_dtype)
    vae.to(accelerator.device)
    stn.to(accelerator.device).train()
    pipe = STNAlignmentPipeline(vae=vae, stn=stn)

    # 3. Data: every photo encoded once (or on demand), validation pairs encoded once.
    settings = data.PoolSettings(
        resolution=args.resolution, warp=warp_range_from_args(args), warp_space=args.warp_space,
        pairs_per_image=args.pairs_per_image, photometric=args.photometric, seed=args.seed,
    )
    cache_started = time.perf_counter()
    pool = build_training_pool(args, pipe, sources, cache_sources, settings, accelerator)
    cache_seconds = time.perf_counter() - cache_started
    validation = validation_set(args, pipe, *held_out) if accelerator.is_main_process else None
    identity_errors = None
    if validation is not None:
        identity = geometry.identity_theta(len(validation["theta"]))
        identity_errors = geometry.corner_error(identity, validation["theta"], args.resolution, args.resolution)

    # 4. Optimiser: the small head that turns matches into θ learns faster than the trunk.
    pairs_per_epoch = len(pool) * max(1, settings.num_views - 1)
    pairs_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(pairs_per_epoch / pairs_per_step)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    head = {id(p) for p in stn.head_parameters()}
    groups = [
        {"params": [p for p in stn.parameters() if id(p) not in head], "lr": args.learning_rate},
        {"params": [p for p in stn.parameters() if id(p) in head], "lr": args.learning_rate * args.head_lr_multiplier},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    from diffusers.optimization import get_scheduler

    # The prepared scheduler steps once per process per optimiser step, hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(ThetaCascade(stn), optimizer, lr_scheduler)

    # 5. Resume: the model, optimiser, scheduler and random states come back from the checkpoint, the
    # batches follow from (seed, step), the latents were read back from the cache: the run goes on as
    # if it had never stopped.
    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = checkpoint_step(checkpoint)
        logger.info(f"Resumed from {checkpoint} at step {global_step}")
    metrics_path = output_dir / METRICS_FILE
    if accelerator.is_main_process:
        if checkpoint is None and metrics_path.exists():
            metrics_path.unlink()
        _truncate_metrics(metrics_path, global_step)
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("stn-finetune", config=tracked)

    # 6. Train.
    logger.info(
        f"{len(pool)} photos, {settings.num_views} views each, {max_train_steps} steps of "
        f"{args.train_batch_size} × {accelerator.num_processes} process(es) × "
        f"{args.gradient_accumulation_steps} accumulation"
    )
    decode = pipe.decode if args.pixel_loss_weight > 0 else None
    progress = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    running: dict[str, list[float]] = {}
    skipped_updates = 0
    started = time.perf_counter()
    model.train()  # a loaded model comes in eval mode; designs may train differently from how they infer
    while global_step < max_train_steps:
        amount = curriculum_amount(global_step, args, max_train_steps)
        for micro in range(args.gradient_accumulation_steps):
            # Spread like data's view seeds (SEED_STRIDE per run, PHOTO_STRIDE per draw, then the process),
            # so that no two (step, micro-batch, process) share a seed.
            draw = (args.seed * data.SEED_STRIDE + global_step) * args.gradient_accumulation_steps + micro
            seed = draw * data.PHOTO_STRIDE + accelerator.process_index
            batch = pool.sample(args.train_batch_size, torch.Generator().manual_seed(seed), amount, args.reference_rate)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss, parts = training_loss(
                    model, batch, args.resolution, args.corner_loss_weight, args.latent_loss_weight,
                    args.theta_loss_weight, args.pixel_loss_weight, decode, args.corner_loss,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and not _gradients_finite(model):
                    # A pair whose refinement diverged (a near-singular Gauss–Newton system) gives a
                    # non-finite gradient that would poison every weight: that update is skipped
                    # (parameters without a gradient are left alone by the optimiser).
                    optimizer.zero_grad(set_to_none=True)
                    skipped_updates += 1
                    if skipped_updates == 1:
                        logger.warning(f"step {global_step}: non-finite gradient, update skipped")
                elif accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for name, value in parts.items():
                running.setdefault(name, []).append(value)
        global_step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{parts['loss']:.3f}", mace=f"{parts['corner_error']:.1f}")

        if global_step % args.logging_steps == 0 or global_step == max_train_steps:
            record = {"step": global_step, **{name: sum(v) / len(v) for name, v in running.items()}}
            record["train_corner_error"] = record.pop("corner_error")
            record.update(lr=lr_scheduler.get_last_lr()[0], warp_amount=amount)
            running.clear()
            accelerator.log(record, step=global_step)
            if accelerator.is_main_process:
                _append_metrics(metrics_path, record)
        if global_step % args.validation_steps == 0 or global_step == max_train_steps:
            if accelerator.is_main_process:
                stats = summarize_errors(validation_corner_error(pipe, validation, args.resolution))
                record = {
                    "step": global_step, "val_corner_error": stats["mean"], "val_corner_error_median": stats["median"],
                    "val_under_5px": stats["under_5px"],
                }  # fmt: skip
                accelerator.log(record, step=global_step)
                _append_metrics(metrics_path, record)
                logger.info(
                    f"step {global_step}: validation corner error {stats['mean']:.2f} px (median {stats['median']:.2f})"
                )
        if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
            save_checkpoint(accelerator, checkpoints_dir, global_step, args.checkpoints_total_limit)
    progress.close()
    train_seconds = time.perf_counter() - started

    # 7. Save the pipeline, with the VAE exactly as it was given (it was only ever read).
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = unwrap_stn(accelerator.unwrap_model(model)).to("cpu")
        final_errors = validation_corner_error(pipe, validation, args.resolution)
        original_vae = vae
        if weight_dtype != torch.float32:
            original_vae = load_vae(args.pretrained_vae_name_or_path, args.vae_subfolder, args.revision)
        STNAlignmentPipeline(vae=original_vae.to("cpu"), stn=trained).save_pretrained(output_dir)
        summary = {
            "num_validation_pairs": len(validation["theta"]), "num_train_images": len(pool), "global_step": global_step,
            "train_seconds": train_seconds, "identity": summarize_errors(identity_errors),
            "final": summarize_errors(final_errors),
        }
        summary.update(cache_seconds=cache_seconds, resumed_from_step=checkpoint_step(checkpoint) if checkpoint else 0)
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        (output_dir / "README.md").write_text(model_card(args, trained, summary))
        logger.info(f"Saved the pipeline to {output_dir}: validation corner error {summary['final']['mean']:.2f} px")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def cli(argv: list[str] | None = None) -> int:
    """``python -m stn_diffusers.finetune``: an input error ends the run with one ``error: ...`` line
    and exit status 2 (its traceback too with ``--debug``); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    return run_reporting_errors(lambda: main(parse_args(argv)), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(cli())
