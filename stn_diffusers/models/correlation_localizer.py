"""`CorrelationLocalizer`: registers moving latents onto reference latents by matching features.

A shared feature pyramid (GroupNorm conv blocks, strides 2/4/8), a local correlation volume
between the reference features and the currently warped moving features, a soft-argmax match for
every reference cell, learned confidences, and a weighted least-squares fit of the transform to
those matches. Each iteration works one pyramid level finer (coarse to fine). Works at any latent
size of at least two cells of the coarsest stride (16 with the default strides).

Reference weights (an ignore mask): every match belongs to a cell of the reference, and the cascade
warps only the moving latents, never the reference, so a per-cell weight given in the reference
frame stays valid at every iteration. It multiplies the learned confidences in the fit: a cell of
weight 0 does not vote at all.

θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import geometry
from .localizer import Localizer, require_reference

# Initial sharpness of the soft-argmax over correlations of unit-length features (range ±1).
INITIAL_MATCH_SCALE = 10.0
# GroupNorm uses this many groups, or the largest divisor of the channel count below it.
MAX_NORM_GROUPS = 8
# Hidden width of each level's confidence head.
CONFIDENCE_CHANNELS = 32
# Bound on a match's log-confidence: exp(10) ≈ 2.2e4 stays finite in fp16 (max 65504).
MAX_LOG_CONFIDENCE = 10.0
# The coarsest grid a fit reads has at least this many cells per side: a single cell shows a
# shift but no rotation or scale.
MIN_GRID_CELLS = 2


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two 3×3 convolutions with GroupNorm: normalisation is what lets the matcher leave identity."""
    groups = math.gcd(MAX_NORM_GROUPS, out_channels)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=True),
    )


class FeaturePyramid(nn.Module):
    """Unit-length matching features at strides 2, 4 and 8 of the latent grid.

    ``(B, C_in, H, W)`` → ``{stride: (B, feature_dim, ⌈H/stride⌉, ⌈W/stride⌉)}``.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], feature_dim: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList(
            _conv_block(channels[i], channels[i + 1], stride=2) for i in range(len(channels) - 1)
        )
        # No ReLU on the projection: signed features correlate better than non-negative ones.
        self.projections = nn.ModuleList(nn.Conv2d(c, feature_dim, 1) for c in channels[1:])

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** (i + 1) for i in range(len(self.blocks)))

    def forward(self, x: torch.Tensor, strides: set[int] | None = None) -> dict[int, torch.Tensor]:
        """Features at ``strides`` (all when ``None``); the pyramid stops after the coarsest one asked for."""
        x = self.stem(x)  # (B, C0, H, W)
        features = {}
        for stride, block, projection in zip(self.strides, self.blocks, self.projections):
            x = block(x)  # (B, C_i, H/stride, W/stride)
            if strides is None or stride in strides:
                features[stride] = F.normalize(projection(x), dim=1)
            if strides is not None and stride >= max(strides):
                break
        return features


def local_correlation(reference: torch.Tensor, moving: torch.Tensor, radius: int) -> torch.Tensor:
    """Correlation of each reference cell with moving cells within ``radius``.

    ``(B, C, h, w)`` × 2 → ``(B, (2r+1)², h, w)``; channel ``i·(2r+1) + j`` holds displacement
    ``(dy, dx) = (i - r, j - r)``. Cells outside the moving map correlate as zero.
    """
    batch, channels, height, width = reference.shape
    window = 2 * radius + 1
    patches = F.unfold(moving, kernel_size=window, padding=radius)  # (B, C·window², h·w)
    patches = patches.view(batch, channels, window * window, height, width)
    return (reference.unsqueeze(2) * patches).sum(dim=1)  # (B, window², h, w)


def cell_centres(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """Normalised centres of an ``h × w`` grid (align_corners=False), ``(h·w, 2)`` as (x, y)."""
    ys = (torch.arange(height, device=like.device, dtype=like.dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=like.device, dtype=like.dtype) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=-1)


@dataclass
class ReferenceContext:
    """What every iteration reads from the reference, computed once (the reference never moves).

    Args:
        features: ``{stride: (B, feature_dim, h, w)}``, the reference features at each iteration stride.
        weights: ``{stride: (B, h·w)}`` in ``[0, 1]``, each cell's share in the fit at that stride
            (1 = use it), or ``None`` when every cell counts fully.
    """

    features: dict[int, torch.Tensor]
    weights: dict[int, torch.Tensor] | None = None


class CorrelationLocalizer(Localizer):
    """Feature matching between the reference and the moving latents, fitted by least squares.

    Args:
        in_channels: latent channels of the VAE.
        conditioning: must be ``"reference"``: the design matches the sample against a reference.
        transform: ``"affine"``, ``"similarity"``, ``"translation"`` (fitted by
            :func:`~stn_diffusers.geometry.fit_affine`, θ ``(B, 2, 3)``) or ``"homography"`` (fitted by
            :func:`~stn_diffusers.geometry.fit_homography`, θ ``(B, 3, 3)``); what the matches are fitted with.
        feature_channels: widths of the pyramid's stem and its stride-2 blocks.
        feature_dim: size of the unit-length matching features.
        iteration_strides: pyramid stride matched at each iteration; later iterations reuse the last.
        search_radius: search radius in cells at each of those strides.
    """

    def __init__(
        self,
        in_channels: int,
        conditioning: str,
        transform: str,
        feature_channels: tuple[int, ...],
        feature_dim: int,
        iteration_strides: tuple[int, ...],
        search_radius: tuple[int, ...],
    ):
        super().__init__()
        require_reference(conditioning, "correlation")
        self.transform = transform
        self.iteration_strides = tuple(iteration_strides)
        self.search_radius = tuple(search_radius)
        self.localization = FeaturePyramid(in_channels, tuple(feature_channels), feature_dim)
        available = self.localization.strides
        if not self.iteration_strides or any(s not in available for s in self.iteration_strides):
            raise ValueError(f"expected iteration_strides drawn from {available}, got {self.iteration_strides}")
        if len(self.search_radius) != len(self.iteration_strides) or min(self.search_radius) < 1:
            raise ValueError(
                f"expected one search_radius >= 1 per iteration stride ({len(self.iteration_strides)}), "
                f"got {self.search_radius}"
            )
        num_levels = len(self.iteration_strides)
        self.log_match_scale = nn.Parameter(torch.full((num_levels,), math.log(INITIAL_MATCH_SCALE)))
        self.confidence = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d((2 * r + 1) ** 2, CONFIDENCE_CHANNELS, 3, padding=1),
                nn.ReLU(True),
                nn.Conv2d(CONFIDENCE_CHANNELS, 1, 3, padding=1),
            )
            for r in self.search_radius
        )
        for head in self.confidence:
            # Zero-initialised confidences: every match counts equally until training says otherwise.
            nn.init.zeros_(head[2].weight)
            nn.init.zeros_(head[2].bias)
        # Each iteration's residual is I + gate · (fit - I); zero gates make the STN start as a no-op,
        # like the seed. Fine-tuning gives these scalars a higher learning rate (see `head_parameters`).
        self.residual_gate = nn.Parameter(torch.zeros(num_levels))

    def _level(self, iteration: int) -> int:
        return min(iteration, len(self.iteration_strides) - 1)

    supports_reference_weights = True

    def prepare(self, reference: torch.Tensor, reference_weights: torch.Tensor | None = None) -> ReferenceContext:
        """Reference features at every iteration stride and, with ``reference_weights`` ``(B, 1, H, W)``
        in ``[0, 1]`` (1 = use the cell), each stride's cell weights: the reference does not move, so
        both are computed once for all iterations.

        Weights reach each pyramid grid by area average, so a cell half covered by ignored latents gets
        half its weight. Adaptive pooling spreads the ``h × w`` cells evenly over the map, as
        :func:`cell_centres` places them when the matches are fitted.
        """
        features = self.localization(reference, set(self.iteration_strides))
        weights = None
        if reference_weights is not None:
            weights = {
                stride: F.adaptive_avg_pool2d(reference_weights.to(grid.dtype), grid.shape[-2:]).flatten(1)
                for stride, grid in features.items()
            }  # {stride: (B, h·w)}
        return ReferenceContext(features, weights)

    def step(self, moving: torch.Tensor, context: ReferenceContext, iteration: int) -> torch.Tensor:
        """θ ``(B, 2, 3)`` (``(B, 3, 3)`` for ``transform="homography"``) fitted to the matches of
        ``moving`` ``(B, C, H, W)`` against the reference features in ``context``, at this iteration's
        pyramid level, each match weighted by its confidence (times its cell's reference weight)."""
        level = self._level(iteration)
        stride = self.iteration_strides[level]
        radius = self.search_radius[level]
        ref = context.features[stride]  # (B, D, h, w)
        mov = self.localization(moving, {stride})[stride]  # (B, D, h, w)
        batch, _, height, width = ref.shape
        correlation = local_correlation(ref, mov, radius)  # (B, (2r+1)², h, w)
        probabilities = torch.softmax(correlation * self.log_match_scale[level].exp(), dim=1)

        # Candidate displacements in normalised coordinates, where one cell spans 2 / width (height).
        window = torch.arange(-radius, radius + 1, device=ref.device, dtype=ref.dtype)
        offset_y, offset_x = torch.meshgrid(window, window, indexing="ij")
        offsets = torch.stack([offset_x.flatten() * 2 / width, offset_y.flatten() * 2 / height], dim=-1)  # (K, 2)
        displacement = torch.einsum("bkhw,kc->bhwc", probabilities, offsets).reshape(batch, -1, 2)  # (B, h·w, 2)

        log_confidence = self.confidence[level](probabilities).clamp(-MAX_LOG_CONFIDENCE, MAX_LOG_CONFIDENCE)
        confidence = log_confidence.exp().flatten(1)  # (B, h·w)
        if context.weights is not None:
            confidence = confidence * context.weights[stride]  # ignored cells do not vote
        source = cell_centres(height, width, ref).expand(batch, -1, -1)  # (B, h·w, 2)
        target = source + displacement
        if self.transform == "homography":
            # No aspect (only a similarity needs square pixels): homographies in pixels and in normalised
            # units are the same 8-dof family.
            fitted = geometry.fit_homography(source, target, confidence)  # (B, 3, 3)
        else:
            aspect = moving.shape[-1] / moving.shape[-2]
            fitted = geometry.fit_affine(source, target, confidence, self.transform, aspect)  # (B, 2, 3)
        # The identity of fitted's shape: eye(2, 3) is the affine identity, eye(3, 3) the projective one.
        identity = torch.eye(*fitted.shape[1:], device=fitted.device, dtype=fitted.dtype).expand_as(fitted)
        return identity + self.residual_gate[level] * (fitted - identity)

    def head_parameters(self) -> list[nn.Parameter]:
        """Residual gates, match sharpness and confidence heads."""
        return [self.residual_gate, self.log_match_scale, *self.confidence.parameters()]

    @property
    def fixed_sample_size(self) -> None:
        return None

    @property
    def min_sample_size(self) -> int:
        return MIN_GRID_CELLS * max(self.iteration_strides)
