"""`SeedLocalizer`: the original localisation design, kept exactly so it can be compared against.

Conv(C→32, 7) → MaxPool 2 → ReLU → Conv(32→64, 5) → MaxPool 2 → ReLU → Linear(64·12·12→32) →
ReLU → Linear(32→P), where P is the number of transform parameters; zero weight and identity bias
on the last layer; fixed C×64×64 input. With ``conditioning="reference"`` the moving and reference
latents are concatenated (C = 2 × latent channels). With the defaults (4 latent channels, affine)
it has 352,710 parameters.

θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import geometry
from .localizer import Localizer

# The localisation net turns 64×64 latents into 64 maps of 12×12, which the regression head reads
# flattened: the design takes this one latent size only.
SEED_SAMPLE_SIZE = 64
SEED_FEATURE_SHAPE = (64, 12, 12)
SEED_HIDDEN_FEATURES = 32
# The transforms the regression head can output (see geometry.params_to_theta). The design is kept as
# the original for comparison, so it regresses no homography: the correlation design fits those.
SEED_TRANSFORMS = ("affine", "similarity", "translation")


class SeedLocalizer(Localizer):
    """A convolutional regressor of θ from the moving latents (and the reference, if conditioned).

    Args:
        in_channels: latent channels of the VAE.
        conditioning: ``"none"`` or ``"reference"`` (the reference is concatenated to the input).
        transform: one of :data:`SEED_TRANSFORMS`; sets the head's outputs.
        sample_size: the latent side; must be :data:`SEED_SAMPLE_SIZE`.
    """

    def __init__(self, in_channels: int, conditioning: str, transform: str, sample_size: int = SEED_SAMPLE_SIZE):
        super().__init__()
        if transform not in SEED_TRANSFORMS:
            raise ValueError(
                f"expected transform in {SEED_TRANSFORMS} for architecture='seed', got {transform!r}; "
                "architecture='correlation' fits homographies"
            )
        if sample_size != SEED_SAMPLE_SIZE:
            raise ValueError(
                f"expected sample_size={SEED_SAMPLE_SIZE} for architecture='seed' (its linear layer reads "
                f"{SEED_FEATURE_SHAPE} features of {SEED_SAMPLE_SIZE}×{SEED_SAMPLE_SIZE} latents), got {sample_size}"
            )
        self.transform = transform
        self.sample_size = sample_size
        input_channels = in_channels * (2 if conditioning == "reference" else 1)
        self.localization = nn.Sequential(
            nn.Conv2d(input_channels, 32, kernel_size=7),  # (B, 32, 58, 58)
            nn.MaxPool2d(2, stride=2),  # (B, 32, 29, 29)
            nn.ReLU(True),
            nn.Conv2d(32, 64, kernel_size=5),  # (B, 64, 25, 25)
            nn.MaxPool2d(2, stride=2),  # (B, 64, 12, 12)
            nn.ReLU(True),
        )
        num_params = len(geometry.identity_params(transform))
        self.fc_loc = nn.Sequential(
            nn.Linear(math.prod(SEED_FEATURE_SHAPE), SEED_HIDDEN_FEATURES),
            nn.ReLU(True),
            nn.Linear(SEED_HIDDEN_FEATURES, num_params),
        )
        self._init_identity()

    def _init_identity(self) -> None:
        # Zero weight + identity bias: the STN starts as a no-op.
        final = self.fc_loc[2]
        nn.init.zeros_(final.weight)
        with torch.no_grad():
            final.bias.copy_(torch.tensor(geometry.identity_params(self.transform)))

    def prepare(
        self, reference: torch.Tensor | None, reference_weights: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The reference latents themselves (or ``None``): each iteration concatenates them anew.

        ``reference_weights`` never reaches here: the regressor reads the latent map as a whole and
        cannot weight cells (:attr:`supports_reference_weights` is False), so
        :class:`~stn_diffusers.SpatialTransformer` refuses them.
        """
        return reference

    def step(self, moving: torch.Tensor, context: torch.Tensor | None, iteration: int) -> torch.Tensor:
        """θ ``(B, 2, 3)`` regressed from ``moving`` ``(B, C, 64, 64)`` (and the reference in ``context``).

        The same weights serve every iteration, so ``iteration`` is not used.
        """
        x = moving if context is None else torch.cat([moving, context], dim=1)  # (B, C_in, 64, 64)
        features = self.localization(x)  # (B, 64, 12, 12)
        params = self.fc_loc(features.flatten(1))  # (B, num_params)
        return geometry.params_to_theta(params, self.transform)

    def head_parameters(self) -> list[nn.Parameter]:
        """The final linear layer, which starts at the identity."""
        return list(self.fc_loc[2].parameters())

    @property
    def fixed_sample_size(self) -> int:
        return self.sample_size

    @property
    def min_sample_size(self) -> int:
        return self.sample_size
