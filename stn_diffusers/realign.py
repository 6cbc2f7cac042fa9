"""Re-align an image-editing model's output onto its input, and paste the untouched pixels back.

Edit models (Qwen-Image-Edit, FLUX Kontext and the like) return an output slightly shifted or zoomed
against the input they were given. :func:`realign_edit` estimates that motion with an
:class:`~stn_diffusers.STNAlignmentPipeline` (the edited region left out of the estimate), warps the
output back onto the input at the input's size, and with ``paste_back=True`` returns the input's own
pixels outside the edited region and the re-aligned edit inside it, blended over a feathered seam.

θ follows the convention in :mod:`stn_diffusers.geometry`: it maps the input's (the reference's)
normalised coordinates to the edit output's, so ``warp(edited, θ, size=original size)`` lies on the
input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from . import geometry
from .images import ImageInput, tensor_to_pil, to_mask_tensor, to_rgb_tensor

OUTPUT_TYPES = ("pil", "np", "pt")
# The seam is feathered over this share of the shorter side by default (a Gaussian of that sigma).
DEFAULT_FEATHER = 0.01
# Without an edit mask, a pixel counts as edited where the re-aligned output differs from the input by
# more than this (mean absolute difference over RGB after a light blur), or by more than
# EDIT_NOISE_FACTOR times the typical difference, whichever is larger: JPEG and resampling stay below.
EDIT_THRESHOLD = 0.08
EDIT_NOISE_FACTOR = 4.0
# A region found to cover more than this share is not an edit but a failed first estimate: not used.
MAX_FOUND_REGION = 0.6
# The estimated edited region is grown by this share of the shorter side, so its seam falls outside.
EDIT_GROWTH = 0.02
# ECC's mask margin (pixels per pyramid level) around a region found from the difference: already
# grown by EDIT_GROWTH, it needs only room for ECC's own correction (see refine.ECC_MASK_MARGIN).
FOUND_REGION_ECC_MARGIN = 2


@dataclass
class RealignEditOutput(BaseOutput):
    """What :func:`realign_edit` returns.

    Args:
        image: the edit output re-aligned onto the input at the input's size; with ``paste_back``, the
            input outside the edited region and the re-aligned edit inside it. PIL, ``(H, W, 3)`` numpy
            or ``(3, H, W)`` torch in ``[0, 1]`` by ``output_type``.
        theta: ``(1, 2, 3)`` (``(1, 3, 3)`` for a homography) from the input's frame to the edit output's.
        edit_mask: ``(1, H, W)`` float in ``[0, 1]`` at the input's size: the edited region used for the
            blend (the given mask, or the one estimated from the difference), feathered.
        refined: whether ECC refined θ (``None`` when ``refine=None`` or θ was given).
        confidence: the pipeline's confidence in θ, in ``[0, 1]`` (``None`` when θ was given).
    """

    image: PIL.Image.Image | np.ndarray | torch.Tensor
    theta: torch.Tensor
    edit_mask: torch.Tensor
    refined: bool | None
    confidence: float | None


def _check_theta(theta: torch.Tensor) -> torch.Tensor:
    """A given θ as ``(1, 2, 3)`` or ``(1, 3, 3)`` float32; a named error for any other shape."""
    if not isinstance(theta, torch.Tensor):
        raise TypeError(f"expected theta as a torch.Tensor of shape (1, 2, 3) or (1, 3, 3), got {type(theta).__name__}")
    if theta.ndim == 2:
        theta = theta[None]
    if theta.ndim != 3 or theta.shape[0] != 1 or tuple(theta.shape[1:]) not in ((2, 3), (3, 3)):
        raise ValueError(f"expected theta of shape (1, 2, 3) or (1, 3, 3) (one edit), got {tuple(theta.shape)}")
    if not torch.isfinite(theta).all():
        raise ValueError("expected a finite theta, got NaN or infinite entries")
    return theta.float().cpu()


def _check_edit_mask(edit_mask: ImageInput, size: tuple[int, int]) -> torch.Tensor:
    """The edit mask as binary ``(1, H, W)`` at the original's ``size``; named errors otherwise."""
    mask = to_mask_tensor(edit_mask, "edit_mask")  # type, channels and values checked there
    if tuple(mask.shape[-2:]) != size:
        raise ValueError(
            f"expected edit_mask of the original's size, {size[1]}×{size[0]} (it marks pixels of the original), "
            f"got {mask.shape[-1]}×{mask.shape[-2]}"
        )
    if bool(mask.min() >= 1):
        raise ValueError(
            "expected edit_mask to leave some of the original unedited (black = unedited): the motion is "
            "estimated from those pixels, and a mask that covers everything leaves none"
        )
    return mask


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(B, C, H, W)`` blurred by a separable Gaussian of ``sigma`` pixels (reflected borders)."""
    if sigma <= 0:
        return image
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    # Reflection needs the pad below the side; a huge sigma on a tiny image falls back to replicate.
    mode = "reflect" if radius < min(image.shape[-2:]) else "replicate"
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode=mode), horizontal, groups=channels)
    return F.conv2d(F.pad(image, (0, 0, radius, radius), mode=mode), vertical, groups=channels)


def estimate_edit_region(aligned: torch.Tensor, original: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """The edited region ``(1, H, W)`` in ``{0, 1}`` from a re-aligned edit output and its input, both
    ``(3, H, W)`` in ``[0, 1]``, over the ``covered`` ``(1, H, W)`` pixels the output reaches.

    Where the two differ (after a light blur, which JPEG and resampling noise do not survive) by more
    than :data:`EDIT_THRESHOLD`, or :data:`EDIT_NOISE_FACTOR` times the typical difference, the pixel
    is edited; the region is then grown by :data:`EDIT_GROWTH` of the shorter side.
    """
    shorter = min(original.shape[-2:])
    blur = max(1.0, shorter / 512)
    difference = (gaussian_blur(aligned[None], blur) - gaussian_blur(original[None], blur)).abs().mean(1)[0]  # (H, W)
    inside = covered[0] > 0.5
    typical = float(difference[inside].median()) if bool(inside.any()) else 0.0
    edited = ((difference > max(EDIT_THRESHOLD, EDIT_NOISE_FACTOR * typical)) & inside).float()[None, None]
    grow = max(1, round(EDIT_GROWTH * shorter))
    return F.max_pool2d(edited, 2 * grow + 1, stride=1, padding=grow)[0]


def realign_edit(
    edited: ImageInput,
    original: ImageInput,
    edit_mask: ImageInput | None = None,
    *,
    pipeline=None,
    paste_back: bool = False,
    refine: str | None = "ecc",
    feather: float | None = None,
    theta: torch.Tensor | None = None,
    output_type: str = "pil",
) -> RealignEditOutput:
    """Warp an edit model's output back onto its input (and optionally paste the input back around the edit).

    Args:
        edited: the edit model's output (PIL, numpy or torch, as the pipeline takes); any size.
        original: the input it was made from: the reference frame, and the output's size.
        edit_mask: the region the edit changed, drawn on ``original`` (white = edited), at its size.
            It is left out of the motion estimate; with ``paste_back``, it is where the edit is kept.
            Without it, the estimate uses every pixel; with ``refine="ecc"`` the edited region is
            then found from the difference (:func:`estimate_edit_region`) and ECC runs again without
            it. ``paste_back`` uses the region found.
        pipeline: an :class:`~stn_diffusers.STNAlignmentPipeline` (default: the embedded one).
        paste_back: return the original outside the edited region and the re-aligned edit inside it,
            blended over a seam feathered by ``feather``.
        refine: ``"ecc"`` (default: sub-pixel, on the pixels) or ``None`` (the STN's θ alone).
        feather: the seam's Gaussian sigma in pixels (default: 1 % of the shorter side).
        theta: a known θ ``(1, 2, 3)`` or ``(1, 3, 3)`` to apply instead of estimating one.
        output_type: ``"pil"``, ``"np"`` or ``"pt"``.

    Returns:
        :class:`RealignEditOutput`.

    Example::

        from stn_diffusers import realign_edit
        out = realign_edit(edit_output, input_image, paste_back=True)
        out.image.save("edit_on_input.png")
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"expected output_type in {OUTPUT_TYPES}, got {output_type!r}")
    if feather is not None and not (math.isfinite(feather) and feather >= 0):
        raise ValueError(f"expected feather >= 0 pixels, got {feather}")
    edited_rgb = to_rgb_tensor(edited, "edited")  # (3, h, w)
    original_rgb = to_rgb_tensor(original, "original")  # (3, H, W)
    size = tuple(original_rgb.shape[-2:])
    mask = None if edit_mask is None else _check_edit_mask(edit_mask, size)

    refined = confidence = None
    if theta is None:
        from .default import load_default

        pipe = pipeline if pipeline is not None else load_default()
        out = pipe(edited_rgb, reference=original_rgb, ignore_mask=mask, refine=refine, decode=False, output_type="pt")
        theta = out.theta.float().cpu()
        refined = None if out.refined is None else bool(out.refined[0])
        confidence = None if out.confidence is None else float(out.confidence[0])
        if refine == "ecc":
            theta, refined = _refine_for_edit(edited_rgb, original_rgb, theta, mask, refined)
    else:
        theta = _check_theta(theta)

    # The output warped onto the original's grid, at the original's size, and where it has content.
    aligned, _, covered = _warped(edited_rgb, original_rgb, theta)
    region = mask if mask is not None else estimate_edit_region(aligned, original_rgb, covered)
    sigma = DEFAULT_FEATHER * min(size) if feather is None else feather
    soft = gaussian_blur(region[None], sigma)[0].clamp(0, 1)  # (1, H, W)
    if paste_back:
        # Only where the output has content: beyond its border the original is all there is.
        weight = soft * covered
        image = original_rgb * (1 - weight) + aligned * weight
    else:
        image = aligned
    return RealignEditOutput(
        image=_to_output(image, output_type), theta=theta, edit_mask=soft, refined=refined, confidence=confidence
    )


def _median_difference(edited: torch.Tensor, original: torch.Tensor, theta: torch.Tensor, keep: torch.Tensor | None):
    """Median absolute difference (mean over RGB) between ``edited`` warped by θ and ``original``, over
    the pixels it covers and ``keep`` ``(1, H, W)`` allows: robust to an edit of up to half the picture."""
    aligned, _, covered = _warped(edited, original, theta)
    inside = covered[0] > 0.5
    if keep is not None:
        inside &= keep[0] > 0.5
    if not bool(inside.any()):
        return float("inf")
    return float((aligned - original).abs().mean(0)[inside].median())


def _refine_for_edit(
    edited: torch.Tensor, original: torch.Tensor, theta: torch.Tensor, mask: torch.Tensor | None, refined: bool | None
) -> tuple[torch.Tensor, bool | None]:
    """ECC tuned for an edit output: started from the pipeline's θ and from the identity (an edit model
    moves its output by a few percent, inside ECC's own basin), the better by the median difference
    kept; without a mask, once more with the edited region found after it left out.

    The pipeline's estimate uses every pixel when no mask is given, and a large edit can pull it
    away; the identity start does not depend on it. The median difference ignores the edit itself.
    """
    from .refine import refine_theta_ecc

    keep = None if mask is None else 1 - mask
    from_identity = refine_theta_ecc(original[None], edited[None], None, reference_mask=keep)
    candidates = [(theta, refined)]
    if bool(from_identity.converged[0]):
        candidates.append((from_identity.theta.float(), True))
    theta, refined = min(candidates, key=lambda c: _median_difference(edited, original, c[0], keep))
    if mask is None:
        found = estimate_edit_region(*_warped(edited, original, theta))
        if 0 < float(found.mean()) < MAX_FOUND_REGION:
            # The region found is already grown by EDIT_GROWTH: ECC's usual margin would leave too little.
            again = refine_theta_ecc(
                original[None], edited[None], theta, reference_mask=1 - found, mask_margin=FOUND_REGION_ECC_MARGIN
            )
            if bool(again.converged[0]):
                theta, refined = again.theta.float(), True
    return theta, refined


def _warped(edited: torch.Tensor, original: torch.Tensor, theta: torch.Tensor):
    """``(aligned (3, H, W), original, covered (1, H, W))``: ``edited`` warped by θ onto ``original``'s
    grid and size, and the pixels it reaches."""
    size = tuple(original.shape[-2:])
    aligned = geometry.warp(edited[None], theta, size=size, mode="bicubic")[0].clamp(0, 1)
    covered = geometry.warp(torch.ones(1, 1, *edited.shape[-2:]), theta, size=size, mode="nearest")[0]
    return aligned, original, covered


def _to_output(image: torch.Tensor, output_type: str):
    if output_type == "pil":
        return tensor_to_pil(image)
    if output_type == "np":
        return image.permute(1, 2, 0).numpy()
    return image
