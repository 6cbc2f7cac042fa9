"""Image folders and seeded misaligned pairs, shared by fine-tuning, evaluation and analysis.

A pair is made from one photo: the reference ``R`` is a ``resolution × resolution`` crop; the
moving image ``M`` shows the same scene moved by a random affine ``A`` about the crop centre,
sampled from the *whole* photo, so ``M`` has real content where a crop-and-warp would have
padding. The ground-truth θ that aligns ``M`` onto ``R`` is ``A`` (see ``geometry``):
``warp(M, theta) ≈ R`` wherever the photo covers both.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from . import geometry
from .images import load_image, to_rgb_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), by extension.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for one with no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a folder of images at {str(folder)!r}, found none")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"expected image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}, found none")
    return paths


def load_images(paths: list[Path], strict: bool = False) -> tuple[list[PIL.Image.Image], list[Path]]:
    """Load RGB images; unreadable files are skipped with one warning that counts and names them.

    Returns ``(images, loaded_paths)``. With ``strict=True`` the first unreadable file raises.
    """
    images, loaded, bad = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            loaded.append(Path(path))
        except ValueError:
            if strict:
                raise
            bad.append(Path(path))
    if bad:
        names = ", ".join(str(p) for p in bad)
        logger.warning("Skipped %d unreadable image(s): %s", len(bad), names)
    if not images:
        raise ValueError(f"expected at least one readable image, all {len(paths)} failed to load")
    return images, loaded


def fit_shorter_side(image: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Resize ``(3, H, W)`` so its shorter side lies in ``[low, high]`` (aspect kept).

    Images smaller than ``low`` are upscaled to it; larger than ``high``, downscaled to it.
    """
    shorter = min(image.shape[-2:])
    target = min(max(shorter, low), high)
    if target == shorter:
        return image
    scale = target / shorter
    size = [max(low, round(side * scale)) for side in image.shape[-2:]]
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def crop_theta(
    source_size: tuple[int, int], crop_size: int, generator: torch.Generator | None, margin: float = 0.0
) -> torch.Tensor:
    """θ ``(1, 2, 3)`` that samples a random ``crop_size`` square from a source of ``(H, W)``.

    The crop centre keeps ``margin`` (a fraction of the crop) from the source edges where the
    source is large enough, so warped views of the crop still find real content.
    """
    height, width = source_size
    theta = torch.zeros(1, 2, 3)
    for axis, extent in ((0, width), (1, height)):
        half = crop_size / 2 * (1 + margin)
        low, high = min(half, extent / 2), max(extent - half, extent / 2)
        centre = low + (high - low) * torch.rand(1, generator=generator).item()
        theta[0, axis, axis] = crop_size / extent
        theta[0, axis, 2] = 2 * centre / extent - 1
    return theta


@dataclass
class Pair:
    """A misaligned pair: ``reference`` and ``moving`` ``(3, S, S)`` in ``[0, 1]``; ``theta`` ``(2, 3)``
    aligns ``moving`` onto ``reference``; ``name`` is the source photo."""

    reference: torch.Tensor
    moving: torch.Tensor
    theta: torch.Tensor
    name: str = ""


def make_pair(
    source: torch.Tensor,
    resolution: int,
    theta: torch.Tensor,
    generator: torch.Generator | None = None,
    margin: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference, moving)``, each ``(3, resolution, resolution)``, from one source ``(3, H, W)``.

    ``theta`` ``(1, 2, 3)`` is the misalignment to synthesise (the θ that aligns moving onto reference).
    """
    crop = crop_theta(tuple(source.shape[-2:]), resolution, generator, margin)
    size = (resolution, resolution)
    batch = source.unsqueeze(0)
    reference = geometry.warp(batch, crop, size=size)[0]
    # M(q) = R(θ⁻¹ q) = S(crop · θ⁻¹ q): sample the moving view straight from the whole photo.
    moving = geometry.warp(batch, geometry.compose_theta(crop, geometry.invert_theta(theta)), size=size)[0]
    return reference, moving


def photometric_jitter(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A second shot of the same scene: brightness, contrast, gamma, sensor noise, JPEG.

    ``(3, H, W)`` in ``[0, 1]`` → same shape; deterministic for a given ``generator`` state.
    """

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(1, generator=generator).item()

    out = image.clamp(0, 1) ** uniform(0.8, 1.25)  # gamma
    mean = out.mean()
    out = (out - mean) * uniform(0.8, 1.2) + mean + uniform(-0.08, 0.08)  # contrast, brightness
    noise = torch.randn(out.shape, generator=generator) * uniform(0.005, 0.02)
    out = (out + noise).clamp(0, 1)
    quality = int(uniform(60, 95))
    buffer = io.BytesIO()
    array = (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with PIL.Image.open(buffer) as jpeg:
        return to_rgb_tensor(jpeg)


def seeded_pairs(
    sources: list[torch.Tensor],
    num_pairs: int,
    resolution: int = 512,
    warp: str | geometry.WarpRange = "standard",
    seed: int = 0,
    photometric: str = "none",
    names: list[str] | None = None,
) -> list[Pair]:
    """``num_pairs`` pairs cycling over ``sources`` ``(3, H, W)``; identical for the same arguments.

    Each pair has its own generator seeded from ``(seed, index)``, so pair ``i`` does not depend on
    how many pairs are drawn. ``photometric``: ``"none"`` or ``"realistic"`` (see :func:`photometric_jitter`).
    """
    if photometric not in ("none", "realistic"):
        raise ValueError(f"expected photometric in ('none', 'realistic'), got {photometric!r}")
    if not sources:
        raise ValueError("expected at least one source image, got none")
    warp_range = geometry.get_warp_range(warp)
    pairs = []
    for index in range(num_pairs):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        source_index = index % len(sources)
        source = fit_shorter_side(sources[source_index], resolution, 2 * resolution)
        theta = geometry.random_theta(1, warp_range, resolution, resolution, generator)
        reference, moving = make_pair(source, resolution, theta, generator)
        if photometric == "realistic":
            moving = photometric_jitter(moving, generator)
        name = names[source_index] if names is not None else f"image{source_index}"
        pairs.append(Pair(reference=reference, moving=moving, theta=theta[0], name=name))
    return pairs
