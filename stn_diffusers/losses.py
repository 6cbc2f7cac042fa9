"""The fine-tuning objective: every cascade iteration's θ against the known transform.

Shared by fine-tuning (:mod:`stn_diffusers.finetune`) and analysis (the gradient-flow check), so
both measure the same loss. θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import geometry
from .models.spatial_transformer import SpatialTransformer


class ThetaCascade(nn.Module):
    """Wraps the STN so that one ``forward`` returns every cascade iteration's θ.

    Distributed data parallel synchronises gradients through ``forward`` only, so training calls
    this instead of ``stn.predict_theta``. ``(B, C, h, w)`` × 2 → list of θ ``(B, 2, 3)``
    (``(B, 3, 3)`` for a homography model).
    """

    def __init__(self, stn: SpatialTransformer):
        super().__init__()
        self.stn = stn

    def forward(self, moving: torch.Tensor, reference: torch.Tensor | None) -> list[torch.Tensor]:
        return self.stn.predict_theta(moving, reference, return_intermediate=True)


def unwrap_stn(model: nn.Module) -> SpatialTransformer:
    while not isinstance(model, SpatialTransformer):
        model = model.module if hasattr(model, "module") else model.stn
    return model


CORNER_LOSSES = ("mean", "log")


def training_loss(
    stn: nn.Module,
    batch: dict,
    resolution: int,
    corner_weight: float = 1.0,
    latent_weight: float = 0.0,
    theta_weight: float = 0.0,
    pixel_weight: float = 0.0,
    decode=None,
    corner_loss: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """The fine-tuning loss of one batch, and its parts as floats.

    Args:
        stn: a :class:`SpatialTransformer` or a :class:`ThetaCascade` around one.
        batch: ``{"moving": (B, C, h, w), "reference": (B, C, h, w), "theta": (B, 2, 3) or (B, 3, 3)}`` on the
            STN's device; ``theta`` aligns moving onto reference.
        resolution: pixels per side the corner error is measured in.
        corner_weight: mean corner error in pixels of every cascade iteration's θ (iteration ``k``
            of ``K`` weighted ``k / Σk``: later ones count more); independent of parameterisation.
        latent_weight: MSE between the aligned and the reference latents, only where the warp
            sampled inside the moving latents (the padded border is masked out).
        theta_weight: MSE between the predicted and true θ entries (the seed recipe's target).
        pixel_weight: MSE between ``decode(aligned)`` and ``decode(reference)``; needs ``decode``.
        corner_loss: ``"mean"`` (the mean corner error in pixels) or ``"log"`` (the mean of
            ``log(1 + error)``): a design that searches before it refines either finds a pair or does
            not, and a pair it misses by 100 px says little about how to refine; the log keeps such
            pairs from drowning the gradient of the pairs it finds.

    Returns:
        ``(loss, {"loss": …, "corner_error": …, …})``; ``corner_error`` is the final θ's, in pixels.
    """
    if corner_loss not in CORNER_LOSSES:
        raise ValueError(f"expected corner_loss in {CORNER_LOSSES}, got {corner_loss!r}")
    moving, reference, true = batch["moving"], batch["reference"], batch["theta"]
    config = unwrap_stn(stn).config
    condition = reference if config.conditioning == "reference" else None
    if isinstance(stn, SpatialTransformer):
        thetas = stn.predict_theta(moving, condition, return_intermediate=True)
    else:
        thetas = stn(moving, condition)
    thetas = [theta.float() for theta in thetas]
    true = true.float()
    final = thetas[-1]
    parts = {"corner_error": geometry.corner_error(final.detach(), true, resolution, resolution).mean()}
    loss = final.new_zeros(())
    if corner_weight > 0:
        weights = [k + 1 for k in range(len(thetas))]
        errors = [geometry.corner_error(theta, true, resolution, resolution) for theta in thetas]
        errors = [(error.log1p() if corner_loss == "log" else error).mean() for error in errors]
        corner = sum(w * error for w, error in zip(weights, errors)) / sum(weights)
        parts["corner_loss"] = corner
        loss = loss + corner_weight * corner
    if theta_weight > 0:
        if geometry.is_homography(final) or geometry.is_homography(true):  # compare like with like
            parts["theta_loss"] = F.mse_loss(geometry.to_homogeneous(final), geometry.to_homogeneous(true))
        else:
            parts["theta_loss"] = F.mse_loss(final, true)
        loss = loss + theta_weight * parts["theta_loss"]
    if latent_weight > 0 or pixel_weight > 0:
        aligned = geometry.warp(moving.float(), final, padding_mode=config.padding_mode)
        if latent_weight > 0:
            mask = geometry.valid_mask(final.detach(), *moving.shape[-2:])  # (B, 1, h, w)
            squared = (aligned - reference.float()) ** 2 * mask
            parts["latent_loss"] = squared.sum() / (mask.sum() * moving.shape[1]).clamp_min(1.0)
            loss = loss + latent_weight * parts["latent_loss"]
        if pixel_weight > 0:
            if decode is None:
                raise ValueError("expected a decode function for pixel_weight > 0, got None")
            with torch.no_grad():
                target = decode(reference)
            parts["pixel_loss"] = F.mse_loss(decode(aligned).float(), target.float())
            loss = loss + pixel_weight * parts["pixel_loss"]
    parts["loss"] = loss
    return loss, {name: float(value.detach()) for name, value in parts.items()}
