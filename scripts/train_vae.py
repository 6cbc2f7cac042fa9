"""Train a small diffusers VAE (``AutoencoderKL`` or ``AutoencoderTiny``) with Stable Diffusion's latent layout,
from scratch, on CPU.

The latent layout is Stable Diffusion's: 8x downsampling (four resolution levels, three downsamples)
and 4 latent channels, so latents of a 512x512 image are (4, 64, 64). The model is small enough that its
fp16 safetensors weights take about 4 MB. The embedded default's VAE trained for 32 minutes on two CPU
threads (8,805 steps) to 23.2 dB held-out PSNR; 24 minutes on one thread reach about 22.6 dB.

``--vae_type`` picks the class:

- ``autoencoder_kl`` (the default): one width per level (``--block_out_channels``), shared by the
  encoder and the decoder, ``--layers_per_block`` ResNets per level, GroupNorm, a Gaussian posterior.
- ``autoencoder_tiny``: TAESD's architecture. The encoder and the decoder are sized independently
  (``--encoder_block_out_channels``/``--num_encoder_blocks``, ``--decoder_block_out_channels``/
  ``--num_decoder_blocks``; each keeps one width at every level), so a narrow encoder with no block at
  full resolution can feed a wider decoder: the encoder is what alignment runs, the decoder only
  reconstructs. The encoder is deterministic (``encode(x).latents``): no posterior, no KL term, and the
  KL-only flags (``--kl_weight``, ``--initial_posterior_logvar``, ``--norm_num_groups``) are ignored.
  diffusers' pretrained TAESD ships ``scaling_factor`` 1.0 because it was distilled to reproduce the
  already scaled latents of Stable Diffusion's VAE; a model trained here has its own latent scale, so
  ``scaling_factor`` is measured as for AutoencoderKL and pipelines multiply ``latents`` by it, as
  they do for any VAE. ``latent_magnitude`` and ``latent_shift`` keep their defaults: they only map raw
  latents to [0, 1] for storage as images (``scale_latents``), and the decoder soft-clamps raw latents
  to +-``latent_magnitude`` with a tanh, inside which training keeps them.

Usage (after ``python scripts/fetch_photos.py --output data/photos``; ``scripts/train_default.py``
runs it with the embedded default's flags)::

    python scripts/train_vae.py \\
        --train_data_dir data/photos/train --validation_data_dir data/photos/heldout \\
        --output_dir data/default_vae --max_train_minutes 32 --max_train_steps 20000 --num_threads 2

Training: random square crops (``--resolution``) with random horizontal flips, taken from the training
photos resized to several scales (``--train_scales``, shorter side in pixels) so that detail at the
evaluation scale is seen. Loss = L1 on pixels in [-1, 1] + ``--gradient_loss_weight`` x L1 on the
horizontal and vertical finite differences + ``--kl_weight`` x KL (AutoencoderKL only), where the KL is summed over the
latent and divided by the number of pixel values, so that the weight has the meaning it had in Stable
Diffusion (whose reconstruction loss was a sum over pixels). AdamW with linear warm-up and cosine decay
that ends at ``--max_train_steps`` or at the ``--max_train_minutes`` budget, whichever comes first (so the
number of steps depends on the machine when a budget is given; it is recorded in the log); bfloat16
autocast (``--mixed_precision``) on CPUs that support it.

Two choices make training from scratch fast enough for a half-hour budget: residual branches start at
zero (every block starts as identity), and GroupNorm uses one group. GroupNorm removes each group's
per-image mean and scale, and the encoder and decoder each end in one; with many small groups the
average colour of an image is removed and has to be re-learned from differences between channels,
which showed as washed-out colours. With one group only the overall mean and scale are removed.

After training, ``scaling_factor`` is set from the data as Stable Diffusion did: one over the standard
deviation of the posterior-mode latents of training crops (an AutoencoderTiny's deterministic latents;
``shift_factor`` stays at the class default). The model is evaluated on the held-out photos: shorter
side resized to 512, 512x512 centre crop, posterior mode, decode, PSNR on [0, 1]. Writes
``<output_dir>/config.json``, ``diffusion_pytorch_model.safetensors`` (fp32) and ``train_log.json``
(settings, wall time, final losses, held-out PSNR per image).

Latents that warp like the pixels (``--equivariance_weight`` > 0, after EQ-VAE): each step also
warps the crops by a random ``--equivariance_warp`` θ (a :data:`stn_diffusers.geometry.WARP_PRESETS`
range) and adds ``weight`` x the mean absolute difference between the latents of the warped crops and
the warped latents of the crops, ``|E(warp(x, θ)) - warp(E(x), θ)|``, over the latent cells whose
encoder input holds no padding. EQ-VAE asks the decoder to reconstruct the warped image from warped
latents; asking it of the encoder directly is what an aligner on the latents needs. ``--init_from
DIR`` starts from a saved VAE of ``--vae_type`` (its architecture flags are then read from it).

``--seed`` seeds the initial weights, the crops and the posterior samples: the same command gives the
same weights (bit for bit on the same machine) unless ``--max_train_minutes`` ends training first.
Every ``--checkpointing_steps`` the training state is saved atomically as ``<output_dir>/checkpoint-N``
(see ``stn_diffusers.checkpoints``; only the newest is kept), and ``--resume_from_checkpoint latest``
continues from it.
"""

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stn_diffusers import data  # noqa: E402
from stn_diffusers.checkpoints import checkpoint_step, resolve_checkpoint, save_checkpoint  # noqa: E402
from stn_diffusers.geometry import WARP_PRESETS, random_theta, valid_mask  # noqa: E402
from stn_diffusers.geometry import warp as warp_images  # noqa: E402

logger = get_logger(__name__)

# Stable Diffusion's latent layout: 8x downsampling needs four levels (three downsamples).
NUM_LEVELS = 4
LATENT_CHANNELS = 4
DOWNSAMPLE_FACTOR = 2 ** (NUM_LEVELS - 1)
# --vae_type values, named after the diffusers classes.
AUTOENCODER_KL = "autoencoder_kl"
AUTOENCODER_TINY = "autoencoder_tiny"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a small AutoencoderKL with Stable Diffusion's latent layout.")
    parser.add_argument("--train_data_dir", type=str, default="data/photos/train", help="Folder of training photos.")
    parser.add_argument(
        "--validation_data_dir", type=str, default="data/photos/heldout", help="Folder of held-out photos."
    )
    parser.add_argument("--output_dir", type=str, default="data/default_vae", help="Where the model is saved.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for initialisation and crop sampling.")
    # Model.
    parser.add_argument(
        "--vae_type", type=str, default=AUTOENCODER_KL, choices=list(VAE_BUILDERS), help="The diffusers VAE class."
    )
    parser.add_argument(
        "--zero_init_residuals", type=int, default=1, choices=[0, 1], help="1: residual blocks start as identity."
    )
    # AutoencoderKL: one width per level, shared by the encoder and the decoder.
    parser.add_argument(
        "--block_out_channels", type=int, nargs=NUM_LEVELS, default=[32, 64, 64, 96], help="Channels per level."
    )
    parser.add_argument("--layers_per_block", type=int, default=1, help="ResNet blocks per encoder level.")
    parser.add_argument(
        "--norm_num_groups", type=int, default=1, help="GroupNorm groups (see the docstring); divides every width."
    )
    parser.add_argument(
        "--mid_block_add_attention",
        type=int,
        default=1,
        choices=[0, 1],
        help="1: self-attention in the middle blocks (costly on the encoder's 64x64 latent grid at 512 px).",
    )
    parser.add_argument("--initial_posterior_logvar", type=float, default=-6.0, help="Initial posterior log-variance.")
    parser.add_argument("--kl_weight", type=float, default=1e-6, help="Weight of the per-pixel KL term.")
    # AutoencoderTiny: encoder and decoder sized independently; each keeps one width at every level.
    parser.add_argument(
        "--encoder_block_out_channels",
        type=int,
        nargs=NUM_LEVELS,
        default=[16, 16, 16, 16],
        help="AutoencoderTiny encoder width per level (all equal).",
    )
    parser.add_argument(
        "--num_encoder_blocks",
        type=int,
        nargs=NUM_LEVELS,
        default=[0, 0, 2, 3],
        help="AutoencoderTiny residual blocks per encoder level, finest first (0: the level's conv only).",
    )
    parser.add_argument(
        "--decoder_block_out_channels",
        type=int,
        nargs=NUM_LEVELS,
        default=[48, 48, 48, 48],
        help="AutoencoderTiny decoder width per level (all equal).",
    )
    parser.add_argument(
        "--num_decoder_blocks",
        type=int,
        nargs=NUM_LEVELS,
        default=[3, 3, 3, 1],
        help="AutoencoderTiny residual blocks per decoder level, coarsest first.",
    )
    # Data.
    parser.add_argument("--resolution", type=int, default=64, help="Side of the square training crops.")
    parser.add_argument(
        "--train_scales",
        type=int,
        nargs="+",
        default=[512, 768, 1024],
        help="Shorter sides (px) the training photos are resized to before cropping; never upsampled.",
    )
    parser.add_argument("--train_batch_size", type=int, default=8, help="Crops per step.")
    # Optimisation.
    parser.add_argument("--max_train_steps", type=int, default=6000, help="Optimiser steps at most.")
    parser.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Training wall-time budget; the cosine schedule ends at whichever of the two limits comes first.",
    )
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="Peak learning rate.")
    parser.add_argument("--lr_warmup_steps", type=int, default=100, help="Linear warm-up steps.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.99)
    parser.add_argument("--adam_weight_decay", type=float, default=0.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    parser.add_argument(
        "--gradient_loss_weight", type=float, default=0.0, help="Weight of the L1 loss on image gradients."
    )
    parser.add_argument(
        "--mixed_precision", type=str, default="bf16", choices=["no", "bf16"], help="Autocast precision for training."
    )
    parser.add_argument("--num_threads", type=int, default=1, help="torch CPU threads.")
    # Checkpoints, logging, evaluation.
    parser.add_argument("--checkpointing_steps", type=int, default=500, help="Save the training state every N steps.")
    parser.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help='A checkpoint folder, or "latest" in output_dir.'
    )
    parser.add_argument("--log_every", type=int, default=50, help="Record the mean losses every N steps.")
    parser.add_argument("--validation_steps", type=int, default=250, help="Quick held-out PSNR every N steps.")
    parser.add_argument("--scaling_crops", type=int, default=128, help="Training crops used to set scaling_factor.")
    parser.add_argument("--eval_resolution", type=int, default=512, help="Side of the held-out centre crops.")
    parser.add_argument(
        "--equivariance_weight", type=float, default=0.0, help="Weight of the latent equivariance loss (0: off)."
    )
    parser.add_argument(
        "--equivariance_warp", type=str, default="large", choices=list(WARP_PRESETS),
        help="Range of the random warps of the equivariance loss.",
    )  # fmt: skip
    parser.add_argument("--init_from", type=str, default=None, help="Start from this saved VAE of --vae_type.")
    args = parser.parse_args(argv)
    if args.equivariance_weight < 0:
        raise ValueError(f"expected --equivariance_weight >= 0, got {args.equivariance_weight}")

    if args.vae_type == AUTOENCODER_KL and any(width % args.norm_num_groups for width in args.block_out_channels):
        raise ValueError(
            f"expected norm_num_groups to divide every block width, got {args.norm_num_groups} "
            f"and {args.block_out_channels}"
        )
    if args.vae_type == AUTOENCODER_TINY:
        # EncoderTiny and DecoderTiny map each level to the next with a width-preserving conv.
        for name in ("encoder_block_out_channels", "decoder_block_out_channels"):
            widths = getattr(args, name)
            if len(set(widths)) != 1:
                raise ValueError(f"expected one {name} value at every level for autoencoder_tiny, got {widths}")
    if args.resolution % DOWNSAMPLE_FACTOR or args.eval_resolution % DOWNSAMPLE_FACTOR:
        raise ValueError(
            f"expected resolutions divisible by {DOWNSAMPLE_FACTOR}, got {args.resolution} and {args.eval_resolution}"
        )
    if min(args.train_scales) < args.resolution:
        raise ValueError(f"expected every train scale >= resolution {args.resolution}, got {args.train_scales}")
    return args


def build_autoencoder_kl(args) -> AutoencoderKL:
    """A freshly initialised AutoencoderKL with Stable Diffusion's latent layout."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * NUM_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * NUM_LEVELS,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=args.norm_num_groups,
        mid_block_add_attention=bool(args.mid_block_add_attention),
        sample_size=args.eval_resolution,
    )
    if args.initial_posterior_logvar is not None:
        _init_posterior_logvar(vae, args.initial_posterior_logvar)
    return vae


def build_autoencoder_tiny(args) -> AutoencoderTiny:
    """A freshly initialised AutoencoderTiny (TAESD's architecture) with Stable Diffusion's latent layout.

    Its encoder is deterministic (``encode(x).latents``, no posterior) and its decoder soft-clamps the
    raw latents to +-``latent_magnitude`` (3) with a tanh; ``scaling_factor`` is set from the data
    after training, as for AutoencoderKL, so pipelines see unit-variance latents.
    """
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=tuple(args.encoder_block_out_channels),
        decoder_block_out_channels=tuple(args.decoder_block_out_channels),
        num_encoder_blocks=tuple(args.num_encoder_blocks),
        num_decoder_blocks=tuple(args.num_decoder_blocks),
        latent_channels=LATENT_CHANNELS,
    )


VAE_BUILDERS = {AUTOENCODER_KL: build_autoencoder_kl, AUTOENCODER_TINY: build_autoencoder_tiny}


def build_vae(args) -> AutoencoderKL | AutoencoderTiny:
    """A freshly initialised VAE of ``args.vae_type``, or the one saved at ``args.init_from``."""
    if args.init_from is not None:
        cls = {AUTOENCODER_KL: AutoencoderKL, AUTOENCODER_TINY: AutoencoderTiny}[args.vae_type]
        return cls.from_pretrained(args.init_from, torch_dtype=torch.float32)
    vae = VAE_BUILDERS[args.vae_type](args)
    if args.zero_init_residuals:
        _init_residual_branches_to_zero(vae)
    return vae


def _init_residual_branches_to_zero(vae: AutoencoderKL | AutoencoderTiny) -> None:
    """Zero the last layer of every residual branch, so that each ResNet and attention block starts as identity
    (an AutoencoderTiny block as the ReLU it ends with).

    The same initialisation as the zero-initialised output layers of ADM-style diffusion models: the
    network starts shallow and deepens as it learns, which trains faster from scratch.
    """
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, ResnetBlock2D):
                last = module.conv2
            elif isinstance(module, Attention):
                last = module.to_out[0]
            elif isinstance(module, AutoencoderTinyBlock):
                last = module.conv[-1]
            else:
                continue
            last.weight.zero_()
            last.bias.zero_()


def _init_posterior_logvar(vae: AutoencoderKL, logvar: float) -> None:
    """Start every posterior log-variance at ``logvar``: zero weights and constant bias in ``quant_conv``.

    With PyTorch's default initialisation the posterior starts with a standard deviation near 1, as large
    as the latents themselves, and the decoder first learns from mostly noise; with a tiny KL weight the
    variance would have to be unlearned slowly. Starting small, the decoder sees clean latents from step one.
    """
    with torch.no_grad():
        vae.quant_conv.weight[LATENT_CHANNELS:].zero_()  # (8, 8, 1, 1): rows 4..7 give the log-variance
        vae.quant_conv.bias[LATENT_CHANNELS:].fill_(logvar)


def load_photos(folder: str) -> tuple[list[Image.Image], list[Path]]:
    """The readable photos under ``folder`` as RGB PIL images, and their paths (see
    :func:`stn_diffusers.data.load_images`). Kept as PIL images, not float tensors, for the Lanczos
    resizes below and a quarter of the memory."""
    return data.load_images(data.list_images(folder))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (Lanczos, antialiased) so that the shorter side equals ``size``."""
    width, height = image.size
    scale = size / min(width, height)
    return image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float() / 127.5 - 1.0


def scaled_photos(images: list[Image.Image], scales: list[int]) -> list[torch.Tensor]:
    """Every photo at every scale in ``scales`` not above its own shorter side, as uint8 (3, H, W)."""
    pyramid = []
    for image in images:
        for scale in scales:
            if scale <= min(image.size):
                pyramid.append(to_tensor(resize_shorter_side(image, scale)))
    return pyramid


def center_crops(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """Shorter side resized to ``resolution``, then the centred square: uint8 (N, 3, resolution, resolution)."""
    crops = []
    for image in images:
        image = resize_shorter_side(image, resolution)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        crops.append(to_tensor(image.crop((left, top, left + resolution, top + resolution))))
    return torch.stack(crops)


class CropSampler:
    """Random square crops with random horizontal flips; its generator state is checkpointed."""

    def __init__(self, photos: list[torch.Tensor], resolution: int, seed: int):
        self.photos = photos
        self.resolution = resolution
        self.generator = torch.Generator().manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def sample(self, batch_size: int) -> torch.Tensor:
        """A batch of crops in [-1, 1]: (batch_size, 3, resolution, resolution)."""
        crops = []
        for _ in range(batch_size):
            photo = self.photos[self._randint(len(self.photos))]
            top = self._randint(photo.shape[1] - self.resolution + 1)
            left = self._randint(photo.shape[2] - self.resolution + 1)
            crop = photo[:, top : top + self.resolution, left : left + self.resolution]
            crops.append(crop.flip(-1) if self._randint(2) else crop)
        return to_model_range(torch.stack(crops))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class CosineSchedule:
    """Linear warm-up, then cosine decay to zero over the training progress.

    Progress is the larger of ``step / max_steps`` and ``elapsed / max_seconds``, so a wall-time budget
    ends training with a fully decayed learning rate however fast the machine is. The time budget
    counts from the start of this process (a resumed run gets the whole budget again).
    """

    def __init__(self, optimizer, peak_lr: float, warmup_steps: int, max_steps: int, max_seconds: float | None):
        self.optimizer, self.peak_lr, self.warmup_steps = optimizer, peak_lr, warmup_steps
        self.max_steps, self.max_seconds = max_steps, max_seconds
        self.start = time.time()

    def progress(self, step: int) -> float:
        elapsed = (time.time() - self.start) / self.max_seconds if self.max_seconds else 0.0
        return min(1.0, max(step / self.max_steps, elapsed))

    def step(self, step: int) -> float:
        """Set and return the learning rate for optimiser step ``step`` (0-based)."""
        warmup = min(1.0, (step + 1) / max(1, self.warmup_steps))
        lr = self.peak_lr * warmup * 0.5 * (1 + math.cos(math.pi * self.progress(step)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


def gradient_l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two (B, C, H, W) images."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(prediction), dx(target)) + F.l1_loss(dy(prediction), dy(target))


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, 3, H, W) images in [-1, 1], measured on [0, 1]."""
    mse = ((prediction.clamp(-1, 1) - target) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def encode_deterministic(vae: AutoencoderKL | AutoencoderTiny, images: torch.Tensor) -> torch.Tensor:
    """Unscaled latents (B, 4, H/8, W/8) of (B, 3, H, W) images in [-1, 1]: an AutoencoderKL's posterior
    mode, an AutoencoderTiny's ``latents``."""
    encoded = vae.encode(images)
    return encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latents


def equivariance_l1(
    vae: AutoencoderKL | AutoencoderTiny, images: torch.Tensor, latents: torch.Tensor, generator: torch.Generator, warp
) -> torch.Tensor:
    """``mean |E(warp(x, θ)) - warp(E(x), θ)|`` over the latent cells whose encoder input has no padding,
    for one random θ per image of ``warp`` (a warp-range name); ``latents`` ``(B, 4, h, w)`` = E(images)."""
    batch, _, height, width = images.shape
    theta = random_theta(batch, warp, height, width, generator)  # (B, 2, 3), or (B, 3, 3) for a projective range
    warped_latents = encode_deterministic(vae, warp_images(images, theta)).float()
    target = warp_images(latents.float(), theta)
    # A cell counts when no padding is within one cell of it: the encoder's field of view is wider than a cell.
    inside = valid_mask(theta, height, width)  # (B, 1, H, W)
    cells = -F.max_pool2d(-inside, DOWNSAMPLE_FACTOR)  # 1 where the whole cell is inside
    cells = -F.max_pool2d(-cells, 3, stride=1, padding=1)
    difference = (warped_latents - target).abs() * cells
    return difference.sum() / (cells.sum() * latents.shape[1]).clamp_min(1.0)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL | AutoencoderTiny, images: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Encode deterministically and decode, in fp32: (B, 3, H, W) in [-1, 1] -> same shape."""
    outputs = []
    for batch in images.split(batch_size):
        outputs.append(vae.decode(encode_deterministic(vae, batch)).sample)
    return torch.cat(outputs)


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderKL | AutoencoderTiny, sampler: CropSampler, num_crops: int, batch_size: int
) -> tuple[float, float]:
    """Mean and standard deviation of the deterministic latents of ``num_crops`` training crops."""
    latents = []
    for start in range(0, num_crops, batch_size):
        crops = sampler.sample(min(batch_size, num_crops - start))
        latents.append(encode_deterministic(vae, crops))
    latents = torch.cat(latents)
    return latents.mean().item(), latents.std().item()


def fp16_safetensors_bytes(vae: AutoencoderKL | AutoencoderTiny) -> int:
    """Size on disk of the fp16 safetensors weights, measured by saving a copy."""
    with tempfile.TemporaryDirectory() as folder:
        state = {k: v.half() for k, v in vae.state_dict().items()}
        save_file(state, os.path.join(folder, "model.safetensors"))
        return os.path.getsize(os.path.join(folder, "model.safetensors"))


def model_summary(vae: AutoencoderKL | AutoencoderTiny) -> dict:
    """The config entries that size the model, as plain JSON values."""
    if isinstance(vae, AutoencoderTiny):
        keys = ("encoder_block_out_channels", "num_encoder_blocks", "decoder_block_out_channels", "num_decoder_blocks")
    else:
        keys = ("block_out_channels", "layers_per_block", "mid_block_add_attention")
    summary = {}
    for key in keys:
        value = vae.config[key]
        summary[key] = list(value) if isinstance(value, (list, tuple)) else value
    return summary


def main(args):
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    accelerator = Accelerator(cpu=True, mixed_precision=args.mixed_precision)
    # Set after the Accelerator, which may choose its own thread count.
    torch.set_num_threads(args.num_threads)
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    start_time = time.time()
    # Before anything is written: checkpoints that exist but are all incomplete stop the run here.
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)

    # 1. Data.
    train_images, train_paths = load_photos(args.train_data_dir)
    validation_images, validation_paths = load_photos(args.validation_data_dir)
    photos = scaled_photos(train_images, args.train_scales)
    del train_images  # the scaled copies replace them
    output_dir.mkdir(parents=True, exist_ok=True)
    sampler = CropSampler(photos, args.resolution, seed=args.seed)
    # A fixed, cheap probe for progress: 256x256 centre crops of up to 8 held-out photos.
    probe = to_model_range(center_crops(validation_images[:: max(1, len(validation_images) // 8)][:8], 256))
    logger.info(f"{len(train_paths)} training photos ({len(photos)} scaled copies), {len(validation_paths)} held out")

    # 2. Model and optimiser.
    vae = build_vae(args)
    num_parameters = sum(p.numel() for p in vae.parameters())
    logger.info(f"{type(vae).__name__} {model_summary(vae)}: {num_parameters / 1e6:.2f} M parameters")
    optimizer = torch.optim.AdamW(
        vae.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    vae, optimizer = accelerator.prepare(vae, optimizer)
    accelerator.register_for_checkpointing(sampler)

    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        global_step = checkpoint_step(checkpoint)
        logger.info(f"resumed from {checkpoint} at step {global_step}")
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint found; starting from scratch")

    # 3. Train.
    history, window = [], {"l1": 0.0, "gradient": 0.0, "kl": 0.0, "equivariance": 0.0}
    progress = tqdm(
        range(global_step, args.max_train_steps),
        initial=global_step,
        total=args.max_train_steps,
        disable=not accelerator.is_local_main_process,
        desc="train",
    )
    max_seconds = 60 * args.max_train_minutes if args.max_train_minutes else None
    schedule = CosineSchedule(optimizer, args.learning_rate, args.lr_warmup_steps, args.max_train_steps, max_seconds)
    train_start = schedule.start
    vae.train()
    for step in progress:
        if schedule.progress(step) >= 1.0:
            logger.info(f"time budget of {args.max_train_minutes} min reached at step {step}")
            break
        lr = schedule.step(step)
        images = sampler.sample(args.train_batch_size)  # (B, 3, R, R) in [-1, 1]
        with accelerator.autocast():
            encoded = vae.encode(images)
            if hasattr(encoded, "latent_dist"):
                # KL and sampling in fp32: logvar is exponentiated.
                posterior = DiagonalGaussianDistribution(encoded.latent_dist.parameters.float())  # (B, 8, R/8, R/8)
                latents = posterior.sample(generator=sampler.generator)
            else:  # a deterministic encoder (AutoencoderTiny): no posterior, no KL
                posterior, latents = None, encoded.latents  # (B, 4, R/8, R/8)
            reconstruction = vae.decode(latents).sample.float()
        l1 = F.l1_loss(reconstruction, images)
        gradient = gradient_l1(reconstruction, images)
        kl = posterior.kl().mean() / images[0].numel() if posterior is not None else torch.zeros(())
        loss = l1 + args.gradient_loss_weight * gradient + args.kl_weight * kl
        equivariance = torch.zeros(())
        if args.equivariance_weight > 0:
            base = latents if posterior is None else posterior.mode()
            with accelerator.autocast():
                equivariance = equivariance_l1(vae, images, base, sampler.generator, args.equivariance_warp)
            loss = loss + args.equivariance_weight * equivariance
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_step = step + 1

        for name, value in (("l1", l1), ("gradient", gradient), ("kl", kl), ("equivariance", equivariance)):
            window[name] += value.item() / args.log_every
        if global_step % args.log_every == 0:
            seconds = round(time.time() - train_start, 1)
            record = {"step": global_step, "seconds": seconds, "lr": lr}
            record.update({name: round(value, 6) for name, value in window.items()})
            if global_step % args.validation_steps == 0 or global_step == args.max_train_steps:
                vae.eval()
                record["probe_psnr"] = round(psnr(reconstruct(vae, probe, batch_size=8), probe).mean().item(), 3)
                vae.train()
            history.append(record)
            progress.set_postfix({k: v for k, v in record.items() if k in ("l1", "probe_psnr")})
            window = dict.fromkeys(window, 0.0)
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, total_limit=1)
    train_seconds = time.time() - train_start

    # 4. scaling_factor from the data, as Stable Diffusion: 1 / std of the posterior-mode latents.
    vae = accelerator.unwrap_model(vae).eval()
    latent_mean, latent_std = latent_statistics(vae, sampler, args.scaling_crops, args.train_batch_size)
    vae.register_to_config(scaling_factor=1.0 / latent_std)
    logger.info(f"latent mean {latent_mean:.4f}, std {latent_std:.4f} -> scaling_factor {1 / latent_std:.5f}")

    # 5. Evaluate on the held-out photos.
    targets = to_model_range(center_crops(validation_images, args.eval_resolution))
    scores = psnr(reconstruct(vae, targets), targets)
    per_image = {path.name: round(score.item(), 3) for path, score in zip(validation_paths, scores)}
    logger.info(f"held-out PSNR {scores.mean().item():.2f} dB (min {scores.min().item():.2f}, {len(scores)} photos)")

    # 6. Save.
    vae.save_pretrained(output_dir)
    final = history[-1] if history else {}
    log = {
        "settings": vars(args),
        "model": {
            "class": type(vae).__name__,
            **model_summary(vae),
            "latent_channels": vae.config.latent_channels,
            "downsample_factor": DOWNSAMPLE_FACTOR,
            "parameters": num_parameters,
            "fp16_safetensors_bytes": fp16_safetensors_bytes(vae),
            "scaling_factor": vae.config.scaling_factor,
            "latent_mean": latent_mean,
            "latent_std": latent_std,
        },
        "training": {
            "steps": global_step,
            "train_wall_seconds": round(train_seconds, 1),
            "total_wall_seconds": round(time.time() - start_time, 1),
            "seconds_per_step": round(train_seconds / max(1, global_step), 3),
            "final_losses": {k: final.get(k) for k in ("l1", "gradient", "kl", "equivariance")},
            "history": history,
        },
        "heldout": {
            "protocol": f"shorter side resized to {args.eval_resolution} (Lanczos), centre crop "
            f"{args.eval_resolution}x{args.eval_resolution}, deterministic latents (an AutoencoderKL's posterior "
            "mode), fp32, PSNR on [0, 1]",
            "psnr_mean": round(scores.mean().item(), 3),
            "psnr_median": round(scores.median().item(), 3),
            "psnr_per_image": per_image,
        },
        "environment": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
        },
    }
    (output_dir / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    logger.info(f"saved to {output_dir} ({log['training']['total_wall_seconds'] / 60:.1f} min in all)")


if __name__ == "__main__":
    main(parse_args())
