"""`SpatialTransformer`: estimates θ from VAE latents and warps them.

Two localisation designs share one interface:

* ``architecture="seed"`` is the original design, kept exactly so it can be compared against:
  Conv(4→32, 7) → MaxPool 2 → ReLU → Conv(32→64, 5) → MaxPool 2 → ReLU → Linear(64·12·12→32) →
  ReLU → Linear(32→6), zero weight and identity bias on the last layer, fixed 4×64×64 input.
  With ``conditioning="reference"`` the moving and reference latents are concatenated (8 channels).
* ``architecture="correlation"`` registers moving onto reference latents: a shared feature
  pyramid (GroupNorm conv blocks, strides 2/4/8), a local correlation volume between the
  reference features and the currently warped moving features, a soft-argmax match for every
  reference cell, learned confidences, and a weighted least-squares fit of the transform to those
  matches. Each iteration works one pyramid level finer (coarse to fine), warps the moving latents
  by the current θ, estimates the residual and composes it. Works at any latent size ≥ 16.

θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .. import geometry

CONDITIONINGS = ("none", "reference")
ARCHITECTURES = ("seed", "correlation")
TRANSFORMS = ("affine", "similarity", "translation")

# The seed design's localisation net turns 64×64 latents into 64 maps of 12×12.
SEED_SAMPLE_SIZE = 64
SEED_FEATURE_SHAPE = (64, 12, 12)

# Initial sharpness of the soft-argmax over correlations of unit-length features (range ±1).
INITIAL_MATCH_SCALE = 10.0

STN_PRESETS: dict[str, dict] = {
    "seed": {},
    "registration": {
        "conditioning": "reference",
        "architecture": "correlation",
        "transform": "affine",
        "num_iterations": 4,
        "feature_channels": (32, 48, 64, 96),
        "feature_dim": 64,
        "iteration_strides": (8, 4, 2),
        "search_radius": (4, 3, 2),
    },
}


@dataclass
class SpatialTransformerOutput(BaseOutput):
    """Output of :class:`SpatialTransformer`.

    Args:
        sample (`torch.Tensor` of shape `(B, C, H, W)`): the input latents warped by ``theta``.
        theta (`torch.Tensor` of shape `(B, 2, 3)`): the estimated transform (see ``geometry``).
    """

    sample: torch.Tensor
    theta: torch.Tensor


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Two 3×3 convolutions with GroupNorm: normalisation is what lets the matcher leave identity."""
    groups = math.gcd(8, out_channels)
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


class SpatialTransformer(ModelMixin, ConfigMixin):
    r"""A spatial transformer network over VAE latents.

    With no arguments this is the seed design (352,710 parameters, identity at initialisation).
    ``SpatialTransformer(**STN_PRESETS["registration"])`` is the registration design.

    Args:
        in_channels (`int`, defaults to 4): latent channels of the VAE.
        conditioning (`str`, defaults to `"none"`): ``"none"`` sees only the moving latents;
            ``"reference"`` also sees the reference latents (true registration).
        architecture (`str`, defaults to `"seed"`): ``"seed"`` or ``"correlation"`` (see module).
        transform (`str`, defaults to `"affine"`): ``"affine"`` (6 dof), ``"similarity"`` or
            ``"translation"``.
        num_iterations (`int`, defaults to 1): cascade length; each step warps the moving latents by
            the current θ, estimates the residual and composes it.
        padding_mode (`str`, defaults to `"zeros"`): how warped latents are padded.
        sample_size (`int`, defaults to 64): latent size the model was built or trained for; the
            seed design accepts only this size.
        feature_channels, feature_dim, iteration_strides, search_radius: the correlation design's
            feature pyramid widths, matching feature size, pyramid stride used at each iteration
            (later iterations reuse the last) and search radius in cells at each iteration.
        vae_fingerprint (`str`, *optional*): identity of the VAE whose latent space this model
            was trained in; pipelines warn when it is paired with another.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        conditioning: str = "none",
        architecture: str = "seed",
        transform: str = "affine",
        num_iterations: int = 1,
        padding_mode: str = "zeros",
        sample_size: int = SEED_SAMPLE_SIZE,
        feature_channels: tuple[int, ...] = (32, 48, 64, 96),
        feature_dim: int = 64,
        iteration_strides: tuple[int, ...] = (8, 4, 2),
        search_radius: tuple[int, ...] = (4, 3, 2),
        vae_fingerprint: str | None = None,
    ):
        super().__init__()
        self._check_config(in_channels, conditioning, architecture, transform, num_iterations, padding_mode)
        if architecture == "seed":
            self._build_seed(in_channels * (2 if conditioning == "reference" else 1), transform)
        else:
            self._build_correlation(in_channels, feature_channels, feature_dim, iteration_strides, search_radius)

    @staticmethod
    def _check_config(in_channels, conditioning, architecture, transform, num_iterations, padding_mode) -> None:
        choices = {
            "conditioning": (conditioning, CONDITIONINGS),
            "architecture": (architecture, ARCHITECTURES),
            "transform": (transform, TRANSFORMS),
            "padding_mode": (padding_mode, geometry.PADDING_MODES),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"expected {name} in {allowed}, got {value!r}")
        if architecture == "correlation" and conditioning != "reference":
            raise ValueError("expected conditioning='reference' for architecture='correlation' (it matches two inputs)")
        if int(num_iterations) < 1:
            raise ValueError(f"expected num_iterations >= 1, got {num_iterations}")
        if int(in_channels) < 1:
            raise ValueError(f"expected in_channels >= 1, got {in_channels}")

    # ----------------------------------------------------------------------------------- seed design
    def _build_seed(self, input_channels: int, transform: str) -> None:
        self.localization = nn.Sequential(
            nn.Conv2d(input_channels, 32, kernel_size=7),  # (B, 32, 58, 58)
            nn.MaxPool2d(2, stride=2),  # (B, 32, 29, 29)
            nn.ReLU(True),
            nn.Conv2d(32, 64, kernel_size=5),  # (B, 64, 25, 25)
            nn.MaxPool2d(2, stride=2),  # (B, 64, 12, 12)
            nn.ReLU(True),
        )
        num_params = len(geometry.identity_params(transform))
        self.fc_loc = nn.Sequential(nn.Linear(math.prod(SEED_FEATURE_SHAPE), 32), nn.ReLU(True), nn.Linear(32, num_params))
        self._init_identity()

    def _init_identity(self) -> None:
        # Zero weight + identity bias: the STN starts as a no-op.
        final = self.fc_loc[2]
        nn.init.zeros_(final.weight)
        with torch.no_grad():
            final.bias.copy_(torch.tensor(geometry.identity_params(self.config.transform)))

    def _seed_step(self, moving: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
        x = moving if reference is None else torch.cat([moving, reference], dim=1)
        features = self.localization(x)  # (B, 64, 12, 12)
        params = self.fc_loc(features.flatten(1))  # (B, num_params)
        return geometry.params_to_theta(params, self.config.transform)

    # ---------------------------------------------------------------------------- correlation design
    def _build_correlation(self, in_channels, feature_channels, feature_dim, iteration_strides, search_radius) -> None:
        feature_channels, iteration_strides = tuple(feature_channels), tuple(iteration_strides)
        search_radius = tuple(search_radius)
        self.localization = FeaturePyramid(in_channels, feature_channels, feature_dim)
        available = self.localization.strides
        if not iteration_strides or any(s not in available for s in iteration_strides):
            raise ValueError(f"expected iteration_strides drawn from {available}, got {iteration_strides}")
        if len(search_radius) != len(iteration_strides) or min(search_radius) < 1:
            raise ValueError(
                f"expected one search_radius >= 1 per iteration stride ({len(iteration_strides)}), got {search_radius}"
            )
        self.log_match_scale = nn.Parameter(torch.full((len(iteration_strides),), math.log(INITIAL_MATCH_SCALE)))
        self.confidence = nn.ModuleList(
            nn.Sequential(nn.Conv2d((2 * r + 1) ** 2, 32, 3, padding=1), nn.ReLU(True), nn.Conv2d(32, 1, 3, padding=1))
            for r in search_radius
        )
        for head in self.confidence:
            # Zero-initialised confidences: every match counts equally until training says otherwise.
            nn.init.zeros_(head[2].weight)
            nn.init.zeros_(head[2].bias)
        # Each iteration's residual is I + gate · (fit - I); zero gates make the STN start as a no-op,
        # like the seed. Fine-tuning gives these scalars a higher learning rate (see `head_parameters`).
        self.residual_gate = nn.Parameter(torch.zeros(len(iteration_strides)))

    def _level(self, iteration: int) -> int:
        return min(iteration, len(self.config.iteration_strides) - 1)

    def _correlation_step(
        self, moving: torch.Tensor, reference_features: dict[int, torch.Tensor], iteration: int
    ) -> torch.Tensor:
        level = self._level(iteration)
        stride = self.config.iteration_strides[level]
        radius = self.config.search_radius[level]
        ref = reference_features[stride]
        mov = self.localization(moving, {stride})[stride]
        batch, _, height, width = ref.shape
        correlation = local_correlation(ref, mov, radius)  # (B, (2r+1)², h, w)
        probabilities = torch.softmax(correlation * self.log_match_scale[level].exp(), dim=1)

        window = torch.arange(-radius, radius + 1, device=ref.device, dtype=ref.dtype)
        offset_y, offset_x = torch.meshgrid(window, window, indexing="ij")
        offsets = torch.stack([offset_x.flatten() * 2 / width, offset_y.flatten() * 2 / height], dim=-1)  # (K, 2)
        displacement = torch.einsum("bkhw,kc->bhwc", probabilities, offsets).reshape(batch, -1, 2)

        confidence = self.confidence[level](probabilities).clamp(-10, 10).exp().flatten(1)  # (B, h·w)
        source = cell_centres(height, width, ref).expand(batch, -1, -1)
        aspect = moving.shape[-1] / moving.shape[-2]
        fitted = geometry.fit_affine(source, source + displacement, confidence, self.config.transform, aspect)
        identity = geometry.identity_theta(batch, fitted.device, fitted.dtype)
        return identity + self.residual_gate[level] * (fitted - identity)

    def head_parameters(self) -> list[nn.Parameter]:
        """The small parameters that turn matches into θ (gates, match scales, confidences, or the
        seed's final layer); fine-tuning may give them a higher learning rate than the trunk."""
        if self.config.architecture == "seed":
            return list(self.fc_loc[2].parameters())
        return [self.residual_gate, self.log_match_scale, *self.confidence.parameters()]

    # --------------------------------------------------------------------------------------- public
    @property
    def fixed_sample_size(self) -> int | None:
        """The only latent side this model accepts (the seed design's), or ``None`` for any size."""
        return self.config.sample_size if self.config.architecture == "seed" else None

    @property
    def min_sample_size(self) -> int:
        """The smallest latent side this model accepts."""
        if self.fixed_sample_size is not None:
            return self.fixed_sample_size
        return 2 * max(self.config.iteration_strides)

    def check_inputs(self, sample: torch.Tensor, reference: torch.Tensor | None) -> None:
        """Raise ``ValueError``/``TypeError`` naming the expected value for any bad input."""
        channels = self.config.in_channels
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"expected sample to be a torch.Tensor of shape (B, {channels}, H, W), got {type(sample).__name__}")
        if sample.ndim != 4:
            raise ValueError(f"expected sample of shape (B, {channels}, H, W), got {tuple(sample.shape)}")
        if sample.shape[1] != channels:
            raise ValueError(f"expected sample with {channels} channels, shape (B, {channels}, H, W), got {tuple(sample.shape)}")
        if self.config.architecture == "seed":
            size = self.config.sample_size
            if tuple(sample.shape[-2:]) != (size, size):
                raise ValueError(
                    f"expected sample of spatial size ({size}, {size}) for architecture='seed', got {tuple(sample.shape)};"
                    " use architecture='correlation' for other sizes"
                )
        else:
            minimum = 2 * max(self.config.iteration_strides)
            if min(sample.shape[-2:]) < minimum:
                raise ValueError(f"expected sample at least {minimum}×{minimum} latents, got {tuple(sample.shape)}")
        if self.config.conditioning == "reference":
            if reference is None:
                raise ValueError(f"expected a reference of shape {tuple(sample.shape)} for conditioning='reference', got None")
            if not isinstance(reference, torch.Tensor):
                raise TypeError(f"expected reference to be a torch.Tensor, got {type(reference).__name__}")
            if reference.shape != sample.shape:
                raise ValueError(f"expected reference of shape {tuple(sample.shape)} (the sample's), got {tuple(reference.shape)}")
        elif reference is not None:
            raise ValueError("expected reference=None for conditioning='none'; this model does not look at a reference")
        for name, tensor in (("sample", sample), ("reference", reference)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ValueError(f"expected finite values in {name}, got NaN or inf")

    def predict_theta(
        self, sample: torch.Tensor, reference: torch.Tensor | None = None, return_intermediate: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """θ ``(B, 2, 3)`` that aligns ``sample`` (onto ``reference``), without warping the output.

        With ``return_intermediate=True``, the list of θ after each cascade iteration (the last
        is the answer), for training every iteration.
        """
        self.check_inputs(sample, reference)
        theta = geometry.identity_theta(sample.shape[0], sample.device, sample.dtype)
        reference_features = None
        if self.config.architecture == "correlation":
            reference_features = self.localization(reference, set(self.config.iteration_strides))
        thetas = []
        for iteration in range(self.config.num_iterations):
            moving = sample if iteration == 0 else geometry.warp(sample, theta, padding_mode=self.config.padding_mode)
            if self.config.architecture == "seed":
                residual = self._seed_step(moving, reference)
            else:
                residual = self._correlation_step(moving, reference_features, iteration)
            theta = residual if iteration == 0 else geometry.compose_theta(theta, residual)
            thetas.append(theta)
        return thetas if return_intermediate else theta

    def forward(
        self, sample: torch.Tensor, reference: torch.Tensor | None = None, return_dict: bool = True
    ) -> SpatialTransformerOutput | tuple:
        """Estimate θ and warp ``sample`` ``(B, C, H, W)`` with it.

        Returns:
            :class:`SpatialTransformerOutput` (``sample`` ``(B, C, H, W)``, ``theta`` ``(B, 2, 3)``),
            or the tuple ``(sample, theta)`` when ``return_dict=False``.
        """
        theta = self.predict_theta(sample, reference)
        warped = geometry.warp(sample, theta, padding_mode=self.config.padding_mode)
        if not return_dict:
            return (warped, theta)
        return SpatialTransformerOutput(sample=warped, theta=theta)
