"""Encoder and decoder time of candidate VAEs with Stable Diffusion's latent layout, on one CPU thread.

Each candidate encodes one ``resolution``² image (batch 1) and, separately, decodes its latents,
through ``STNAlignmentPipeline.encode`` / ``decode``; the median of ``--repeats`` runs after
``--warmup`` runs is reported, under ``torch.inference_mode`` in fp32. Pin the process to one core
so that the candidates of one run share it::

    taskset -c 1 python benchmarks/vae_speed.py --resolution 512 --repeats 7

Candidates (``--candidates``, default all): ``default`` is the embedded VAE
(``stn_diffusers/weights/default/vae``, fp16 on disk, timed in fp32); the others are built from the
configs in ``CANDIDATES``, randomly initialised (time does not depend on the weights). ``--vae
NAME=FOLDER`` adds a trained VAE (any diffusers VAE class, read from its ``config.json``).
``--channels_last`` also times the encoder with channels-last tensors (oneDNN's faster layout for
narrow convolutions).

In ``CANDIDATES``, ``kl-*`` are ``AutoencoderKL`` configs (one width per level shared by the encoder
and the decoder, one ResNet per level; without mid-block attention, which alone costs more than the
budget on the encoder's 64×64 grid), ``tiny-*`` are ``AutoencoderTiny`` configs (TAESD's
architecture: one width for every encoder level, another for every decoder level; 0 blocks on a
level leaves only its strided conv).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline
from stn_diffusers.default import DEFAULT_PIPELINE_DIR
from stn_diffusers.finetune import load_vae
from stn_diffusers.metrics import format_milliseconds, markdown_table

DEFAULT = "default"
_KL_LAYOUT = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 1,
}


def _kl(widths: tuple[int, ...], attention: bool = False) -> tuple[type, dict]:
    return AutoencoderKL, {**_KL_LAYOUT, "block_out_channels": widths, "mid_block_add_attention": attention}


def _tiny(encoder_width: int, encoder_blocks: tuple[int, ...], decoder_width: int = 64,
          decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)) -> tuple[type, dict]:  # fmt: skip
    return AutoencoderTiny, {
        "encoder_block_out_channels": (encoder_width,) * 4,
        "num_encoder_blocks": encoder_blocks,
        "decoder_block_out_channels": (decoder_width,) * 4,
        "num_decoder_blocks": decoder_blocks,
        "latent_channels": 4,
    }


CANDIDATES: dict[str, tuple[type, dict]] = {
    "kl-8-16-32-64": _kl((8, 16, 32, 64)),
    "kl-8-16-32-64-attention": _kl((8, 16, 32, 64), attention=True),
    "kl-16-32-64-64": _kl((16, 32, 64, 64)),
    "kl-8-16-32-32": _kl((8, 16, 32, 32)),
    "kl-4-16-32-48": _kl((4, 16, 32, 48)),
    "taesd": _tiny(64, (1, 3, 3, 3)),  # diffusers' AutoencoderTiny defaults
    "tiny-e32-0111": _tiny(32, (0, 1, 1, 1)),
    "tiny-e32-0013": _tiny(32, (0, 0, 1, 3)),
    "tiny-e16-0123": _tiny(16, (0, 1, 2, 3)),
    "tiny-e16-0111": _tiny(16, (0, 1, 1, 1)),
    "tiny-e16-0023": _tiny(16, (0, 0, 2, 3)),
    "tiny-e16-0023-d48": _tiny(16, (0, 0, 2, 3), decoder_width=48),
    "tiny-e16-0034-d48": _tiny(16, (0, 0, 3, 4), decoder_width=48),
}


def median_seconds(function, warmup: int, repeats: int) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def describe(vae) -> str:
    """The config entries that size a VAE, in one short cell."""
    config = vae.config
    if isinstance(vae, AutoencoderTiny):
        return (
            f"enc {config.encoder_block_out_channels[0]}×{tuple(config.num_encoder_blocks)}, "
            f"dec {config.decoder_block_out_channels[0]}×{tuple(config.num_decoder_blocks)}"
        )
    attention = ", attention" if getattr(config, "mid_block_add_attention", True) else ""
    return f"{tuple(config.block_out_channels)} × {config.layers_per_block}{attention}"


def count(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.3f} M"


@torch.inference_mode()
def time_vae(vae, resolution: int, warmup: int, repeats: int, channels_last: bool) -> dict[str, float | None]:
    """Median seconds to encode and to decode one ``resolution``² image (and to encode channels-last),
    through the pipeline's own ``encode`` and ``decode`` (posterior mode, scaling included)."""
    pipe = STNAlignmentPipeline(vae=vae.float().eval(), stn=SpatialTransformer())
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, resolution, resolution, generator=generator) * 2 - 1  # (1, 3, R, R) in [-1, 1]
    latents = pipe.encode(images)  # (1, 4, R/8, R/8)
    times = {
        "encode": median_seconds(lambda: pipe.encode(images), warmup, repeats),
        "decode": median_seconds(lambda: pipe.decode(latents), warmup, repeats),
        "encode_channels_last": None,
    }
    if channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
        times["encode_channels_last"] = median_seconds(lambda: pipe.encode(images), warmup, repeats)
    return times


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512, help="Side of the square test image.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed calls before timing.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed calls; the median is reported.")
    parser.add_argument(
        "--candidates", nargs="+", default=[DEFAULT, *CANDIDATES], help=f"Names among {[DEFAULT, *CANDIDATES]}."
    )
    parser.add_argument(
        "--vae", action="append", default=[], metavar="NAME=FOLDER", help="Also time a saved diffusers VAE."
    )
    parser.add_argument("--channels_last", action="store_true", help="Also time the encoder channels-last.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    args = parser.parse_args()
    unknown = [name for name in args.candidates if name != DEFAULT and name not in CANDIDATES]
    if unknown:
        raise ValueError(f"expected candidates among {[DEFAULT, *CANDIDATES]}, got {unknown}")
    if any("=" not in entry for entry in args.vae):
        raise ValueError(f"expected --vae NAME=FOLDER, got {args.vae}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    vaes = {}
    for name in args.candidates:
        if name == DEFAULT:
            vaes[name] = lambda: load_vae(str(DEFAULT_PIPELINE_DIR), subfolder="vae")
        else:
            vae_class, config = CANDIDATES[name]
            vaes[name] = lambda vae_class=vae_class, config=config: vae_class(**config)
    for entry in args.vae:
        name, folder = entry.split("=", 1)
        vaes[name] = lambda folder=folder: load_vae(folder)

    header = ["vae", "class", "config", "encoder params", "decoder params", "encode", "decode"]
    if args.channels_last:
        header.append("encode (channels-last)")
    rows = []
    for name, build in vaes.items():
        torch.manual_seed(0)
        vae = build()
        times = time_vae(vae, args.resolution, args.warmup, args.repeats, args.channels_last)
        row = [name, type(vae).__name__, describe(vae), count(vae.encoder), count(vae.decoder)]
        row += [format_milliseconds(times["encode"]), format_milliseconds(times["decode"])]
        if args.channels_last:
            row.append(format_milliseconds(times["encode_channels_last"]))
        rows.append(row)
        print(" | ".join(str(cell) for cell in row), flush=True)

    print()
    print(
        f"{args.resolution}×{args.resolution}, batch 1, fp32, {torch.get_num_threads()} thread(s), median of "
        f"{args.repeats} after {args.warmup} warm-up; {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
