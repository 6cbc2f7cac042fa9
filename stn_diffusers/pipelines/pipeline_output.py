"""Outputs of the stn-diffusers pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


@dataclass
class STNAlignmentPipelineOutput(BaseOutput):
    """Output of :class:`~stn_diffusers.STNAlignmentPipeline`; with ``return_dict=False`` the
    pipeline returns every field below, ``None`` ones included, as a tuple in this order. Its tensors
    are inference tensors (made under ``torch.inference_mode()``): ``clone()`` one before using it
    with autograd or changing it in place.

    Args:
        images: the aligned latents decoded by the VAE (a VAE round trip), at the working size:
            a list of ``PIL.Image``, a numpy array ``(B, H, W, 3)`` in ``[0, 1]`` or a tensor
            ``(B, 3, H, W)`` in ``[0, 1]``, following ``output_type``; ``None`` for ``"latent"`` and
            with ``decode=False``.
        warped_images: the ORIGINAL inputs warped by ``theta`` at their own full resolution (no VAE
            loss), in the same format; a list when input sizes differ; ``None`` for ``"latent"`` and
            when only latents were given.
        theta (`torch.Tensor` of shape `(B, 2, 3)`, or `(B, 3, 3)` from a homography STN): the estimated
            transforms (see ``geometry``).
        latents (`torch.Tensor` of shape `(B, C, h, w)`): the aligned latents, scaled as the
            diffusion model sees them (``scaling_factor`` and ``shift_factor`` applied).
        displacement (`torch.Tensor` of shape `(B,)`): estimated mean corner motion in pixels of each input.
        unwarped (`torch.Tensor` of shape `(B,)`, bool): True where the motion was below
            ``min_displacement`` and the input was returned unwarped.
        refined (`torch.Tensor` of shape `(B,)`, bool): with ``refine="ecc"``, True where ECC converged
            and refined θ, False where it failed and the STN's θ was kept; ``None`` without refinement.
        confidence (`torch.Tensor` of shape `(B,)`): in ``[0, 1]``, how sure the pixels are that the
            returned θ is within 5 px at 512 px (:func:`stn_diffusers.confidence.alignment_confidence`,
            ignored pixels left out); below ``DEFAULT_CONFIDENCE_THRESHOLD`` (0.5) treat the alignment
            as failed. ``None`` when only latents were given.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    warped_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | list | None
    theta: torch.Tensor
    latents: torch.Tensor
    displacement: torch.Tensor | None = None
    unwarped: torch.Tensor | None = None
    refined: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
