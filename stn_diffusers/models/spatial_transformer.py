"""`SpatialTransformer`: estimates θ from VAE latents and warps them.

Two localisation designs share one interface (:class:`~stn_diffusers.models.localizer.Localizer`),
chosen once by ``architecture``:

* ``"seed"`` (:mod:`~stn_diffusers.models.seed_localizer`): the original convolutional regressor,
  kept exactly so it can be compared against; fixed 4×64×64 input.
* ``"correlation"`` (:mod:`~stn_diffusers.models.correlation_localizer`): feature matching between
  the reference and the moving latents, fitted by least squares, coarse to fine; any latent size
  of at least 16.

The transformer runs the cascade around either: each iteration warps the moving latents by the
current θ, asks the localiser for the residual and composes it.

Reference weights (``reference_weights``, ``(B, 1, h, w)`` in ``[0, 1]`` at latent size, 1 = use):
how much each reference cell may count in the estimate, e.g. 0 over an edited region. Only the
correlation design can weight cells (its fit weights each cell's match); the seed design regresses
θ from the latent map as a whole, so it refuses weights rather than ignore them silently.

θ is ``(B, 2, 3)`` for the affine transforms and ``(B, 3, 3)`` for ``transform="homography"``
(correlation design only: the seed design is kept as the original and regresses no homography).

θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .. import geometry
from .correlation_localizer import CorrelationLocalizer, FeaturePyramid, cell_centres, local_correlation
from .localizer import Localizer
from .search_refine_localizer import SearchRefineLocalizer
from .seed_localizer import SEED_SAMPLE_SIZE, SeedLocalizer

CONDITIONINGS = ("none", "reference")
ARCHITECTURES = ("seed", "correlation", "search_refine")
# The last is projective (θ of shape (B, 3, 3)); the others are affine (B, 2, 3).
TRANSFORMS = ("affine", "similarity", "translation", "homography")

STN_PRESETS: dict[str, dict] = {
    "seed": {},
    "registration": {
        "conditioning": "reference",
        "architecture": "search_refine",
        "transform": "affine",
        "num_iterations": 1,
        "feature_channels": (16,),
        "feature_dim": 4,
        "search_stride": 4,
        "search_rotation": 45.0,
        "search_rotation_step": 10.0,
        "search_scale": 1.4,
        "search_scale_step": 1.12,
        "search_translation": 0.25,
        "search_candidates": 3,
        "refine_strides": (4, 2, 1),
        "refine_iterations": (4, 4, 4),
        "inference_refine_iterations": (4, 6, 8),
        "inference_shear_free_steps": (4, 2, 0),
    },
    # The first registration design (a learned correlation cascade), kept for pipelines saved with it.
    "correlation": {
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

# FeaturePyramid, cell_centres and local_correlation live with the correlation design and are
# re-exported here, where they were first defined.
__all__ = [
    "ARCHITECTURES",
    "CONDITIONINGS",
    "STN_PRESETS",
    "TRANSFORMS",
    "FeaturePyramid",
    "SpatialTransformer",
    "SpatialTransformerOutput",
    "cell_centres",
    "local_correlation",
]


@dataclass
class SpatialTransformerOutput(BaseOutput):
    """Output of :class:`SpatialTransformer`.

    Args:
        sample (`torch.Tensor` of shape `(B, C, H, W)`): the input latents warped by ``theta``.
        theta (`torch.Tensor` of shape `(B, 2, 3)`, or `(B, 3, 3)` for ``transform="homography"``): the
            estimated transform (see ``geometry``).
    """

    sample: torch.Tensor
    theta: torch.Tensor


class SpatialTransformer(ModelMixin, ConfigMixin):
    r"""A spatial transformer network over VAE latents.

    With no arguments this is the seed design (352,710 parameters, identity at initialisation).
    ``SpatialTransformer(**STN_PRESETS["registration"])`` is the registration design.

    Args:
        in_channels (`int`, defaults to 4): latent channels of the VAE.
        conditioning (`str`, defaults to `"none"`): ``"none"`` sees only the moving latents;
            ``"reference"`` also sees the reference latents (true registration).
        architecture (`str`, defaults to `"seed"`): ``"seed"``, ``"correlation"`` or ``"search_refine"``
            (see module).
        transform (`str`, defaults to `"affine"`): ``"affine"`` (6 dof), ``"similarity"``,
            ``"translation"`` (``"seed"`` or ``"correlation"``) or ``"homography"`` (8 dof, θ
            ``(B, 3, 3)``; ``"correlation"`` or ``"search_refine"``).
        num_iterations (`int`, defaults to 1): cascade length; each step warps the moving latents by
            the current θ, estimates the residual and composes it.
        padding_mode (`str`, defaults to `"zeros"`): how warped latents are padded.
        sample_size (`int`, defaults to 64): latent size the model was built or trained for; the
            seed design accepts only 64.
        feature_channels, feature_dim, iteration_strides, search_radius: the correlation design's
            feature pyramid widths, matching feature size, pyramid stride used at each iteration
            (later iterations reuse the last) and search radius in cells at each iteration.
        search_stride, search_rotation, search_rotation_step, search_scale, search_scale_step,
            search_translation, search_candidates, refine_strides, refine_iterations: the search-refine
            design's search grid and Gauss–Newton levels (see
            :class:`~stn_diffusers.models.search_refine_localizer.SearchRefineLocalizer`).
        inference_refine_iterations (`tuple[int, ...]`, *optional*): the most Gauss–Newton steps per
            level at inference (default: ``refine_iterations``, the steps training unrolls). A level
            stops once converged, so a higher cap costs only the pairs that converge slowly.
        search_both_ways (`bool`, *optional*): at inference, also align the reference onto the moving
            image and keep the inverse of that answer when it fits better (twice the cost; default:
            on for ``transform="homography"``, where a viewpoint change can foreshorten the moving
            image beyond the searched scales one way but not the other).
        inference_shear_free_steps (`tuple[int, ...]`, *optional*): per level, how many of the first
            Gauss–Newton steps at inference fit no shear (rotation, a scale per axis and a shift;
            default: none). Coarse levels fitted this way keep a smooth photo from pulling the answer
            into a sheared, squashed view.
        vae_fingerprint (`str`, *optional*): identity of the VAE whose latent space this model
            was trained in; pipelines warn when it is paired with another.

    Attributes:
        localizer (:class:`~stn_diffusers.models.localizer.Localizer`): the design ``architecture``
            chose. Its layers are this model's own, under the same names: ``localization`` and
            ``fc_loc`` (seed); ``localization``, ``log_match_scale``, ``confidence`` and
            ``residual_gate`` (correlation).
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
        search_stride: int = 4,
        search_rotation: float = 45.0,
        search_rotation_step: float = 10.0,
        search_scale: float = 1.4,
        search_scale_step: float = 1.12,
        search_translation: float = 0.25,
        search_candidates: int = 1,
        refine_strides: tuple[int, ...] = (4, 2, 1),
        refine_iterations: tuple[int, ...] = (4, 4, 4),
        inference_refine_iterations: tuple[int, ...] | None = None,
        search_both_ways: bool | None = None,
        inference_shear_free_steps: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self._check_config(in_channels, conditioning, architecture, transform, num_iterations, padding_mode)
        if architecture == "seed":
            localizer = SeedLocalizer(in_channels, conditioning, transform, sample_size)
        elif architecture == "correlation":
            localizer = CorrelationLocalizer(
                in_channels, conditioning, transform, feature_channels, feature_dim, iteration_strides, search_radius
            )
        else:
            localizer = SearchRefineLocalizer(
                in_channels,
                conditioning,
                transform,
                feature_channels,
                feature_dim,
                search_stride,
                search_rotation,
                search_rotation_step,
                search_scale,
                search_scale_step,
                search_translation,
                search_candidates,
                refine_strides,
                refine_iterations,
                inference_refine_iterations,
                search_both_ways,
                inference_shear_free_steps,
            )
        self._adopt(localizer)

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
        if int(num_iterations) < 1:
            raise ValueError(f"expected num_iterations >= 1, got {num_iterations}")
        if int(in_channels) < 1:
            raise ValueError(f"expected in_channels >= 1, got {in_channels}")

    def _adopt(self, localizer: Localizer) -> None:
        """Make the localiser's submodules and parameters this model's own, under the same names.

        Those names are the keys of the published weights (``localization.*``, ``fc_loc.*``,
        ``residual_gate``...), so the localiser is not registered as a submodule (that would prefix
        every key). The two share one registry rather than two references to each parameter:
        loaders (diffusers' low-memory path, ``load_state_dict(assign=True)``) replace parameters
        by name on this model, and the localiser must see the replacements.
        """
        self._modules = localizer._modules
        self._parameters = localizer._parameters
        self._buffers = localizer._buffers
        self._non_persistent_buffers_set = localizer._non_persistent_buffers_set
        # Set past nn.Module.__setattr__, which would register it in the registry it shares.
        self.__dict__["localizer"] = localizer

    def train(self, mode: bool = True) -> "SpatialTransformer":
        """Set training mode here and on the localiser, which is not a registered child (see :meth:`_adopt`)."""
        super().train(mode)
        self.localizer.training = mode
        return self

    # --------------------------------------------------------------------------------------- public
    def head_parameters(self) -> list[nn.Parameter]:
        """The small parameters that turn features into θ (gates, match scales, confidences, or the
        seed's final layer); fine-tuning may give them a higher learning rate than the trunk."""
        return self.localizer.head_parameters()

    @property
    def fixed_sample_size(self) -> int | None:
        """The only latent side this model accepts (the seed design's), or ``None`` for any size."""
        return self.localizer.fixed_sample_size

    @property
    def min_sample_size(self) -> int:
        """The smallest latent side this model accepts."""
        return self.localizer.min_sample_size

    @property
    def supports_reference_weights(self) -> bool:
        """Whether this model takes ``reference_weights`` (the correlation design does, the seed does not)."""
        return self.localizer.supports_reference_weights

    @property
    def supports_moving_weights(self) -> bool:
        """Whether this model takes ``moving_weights`` (the search-refine design does)."""
        return self.localizer.supports_moving_weights

    def check_inputs(
        self,
        sample: torch.Tensor,
        reference: torch.Tensor | None,
        reference_weights: torch.Tensor | None = None,
        moving_weights: torch.Tensor | None = None,
    ) -> None:
        """Raise ``ValueError``/``TypeError`` naming the expected value for any bad input."""
        channels = self.config.in_channels
        if not isinstance(sample, torch.Tensor):
            raise TypeError(
                f"expected sample to be a torch.Tensor of shape (B, {channels}, H, W), got {type(sample).__name__}"
            )
        if sample.ndim != 4:
            raise ValueError(f"expected sample of shape (B, {channels}, H, W), got {tuple(sample.shape)}")
        if sample.shape[1] != channels:
            raise ValueError(
                f"expected sample with {channels} channels, shape (B, {channels}, H, W), got {tuple(sample.shape)}"
            )
        size, fixed, minimum = tuple(sample.shape[-2:]), self.fixed_sample_size, self.min_sample_size
        if fixed is not None and size != (fixed, fixed):
            raise ValueError(
                f"expected sample of spatial size ({fixed}, {fixed}) for architecture={self.config.architecture!r}, "
                f"got {tuple(sample.shape)}; architecture='correlation' takes other sizes"
            )
        if min(size) < minimum:
            raise ValueError(f"expected sample at least {minimum}×{minimum} latents, got {tuple(sample.shape)}")
        if self.config.conditioning == "reference":
            if reference is None:
                raise ValueError(
                    f"expected a reference of shape {tuple(sample.shape)} for conditioning='reference', got None"
                )
            if not isinstance(reference, torch.Tensor):
                raise TypeError(f"expected reference to be a torch.Tensor, got {type(reference).__name__}")
            if reference.shape != sample.shape:
                raise ValueError(
                    f"expected reference of shape {tuple(sample.shape)} (the sample's), got {tuple(reference.shape)}"
                )
        elif reference is not None:
            raise ValueError("expected reference=None for conditioning='none'; this model does not look at a reference")
        for name, tensor in (("sample", sample), ("reference", reference)):
            if tensor is not None and not torch.isfinite(tensor).all():
                raise ValueError(f"expected finite values in {name}, got NaN or inf")
        if reference_weights is not None:
            if not self.supports_reference_weights:
                raise ValueError(
                    f"expected reference_weights=None for architecture={self.config.architecture!r}: it regresses "
                    "θ from the latent map as a whole and cannot weight cells; architecture='correlation' weights "
                    "its matches"
                )
            self._check_cell_weights(sample, reference_weights, "reference_weights", "reference")
        if moving_weights is not None:
            if not self.supports_moving_weights:
                raise ValueError(
                    f"expected moving_weights=None for architecture={self.config.architecture!r}; "
                    "architecture='search_refine' takes them"
                )
            self._check_cell_weights(sample, moving_weights, "moving_weights", "sample")

    @staticmethod
    def _check_cell_weights(sample: torch.Tensor, weights: torch.Tensor, name: str, owner: str) -> None:
        expected = (sample.shape[0], 1, *sample.shape[-2:])
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"expected {name} to be a torch.Tensor of shape {expected}, got {type(weights).__name__}")
        if tuple(weights.shape) != expected:
            raise ValueError(
                f"expected {name} of shape {expected} (one weight per latent cell of each {owner}), "
                f"got {tuple(weights.shape)}"
            )
        if not torch.isfinite(weights).all() or weights.min() < 0 or weights.max() > 1:
            raise ValueError(
                f"expected {name} in [0, 1] (1 = use the cell), "
                f"found values in [{weights.min().item():g}, {weights.max().item():g}]"
            )
        unused = (weights.flatten(1).sum(dim=1) == 0).nonzero().flatten().tolist()
        if unused:
            raise ValueError(
                f"expected {name} that keep some cells of every {owner}, got all zeros at batch "
                f"index {unused}: with every cell ignored there is nothing to estimate the motion from"
            )

    def predict_theta(
        self,
        sample: torch.Tensor,
        reference: torch.Tensor | None = None,
        return_intermediate: bool = False,
        *,
        reference_weights: torch.Tensor | None = None,
        moving_weights: torch.Tensor | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """θ that aligns ``sample`` (onto ``reference``), without warping the output: ``(B, 2, 3)``, or
        ``(B, 3, 3)`` for ``transform="homography"``.

        With ``return_intermediate=True``, the list of θ after each cascade iteration (the last
        is the answer), for training every iteration. ``reference_weights`` ``(B, 1, H, W)`` in
        ``[0, 1]``, in the reference frame at the latents' size: each cell's share in the estimate
        (1 = use, 0 = ignore, e.g. over an edited region); the registration designs (correlation and
        search-refine), not the seed design.
        ``moving_weights`` ``(B, 1, H, W)`` in ``[0, 1]``, in the sample's frame: which of its cells hold
        picture content (0 over zero padding left by an earlier warp); search-refine design only.
        """
        self.check_inputs(sample, reference, reference_weights, moving_weights)
        # The reference (and so its weights) is prepared once: the cascade warps only the sample.
        context = self.localizer.prepare(reference, reference_weights)
        # The first estimate stands as it is: composing it with the identity would only add rounding
        # to a model that starts as an exact no-op.
        # Moving weights go only to a design that takes them, and only when given.
        if moving_weights is not None:
            moving_weights = moving_weights.to(sample.dtype)
        weighted = {} if moving_weights is None else {"moving_weights": moving_weights}
        theta = self.localizer.step(sample, context, 0, **weighted)  # (B, 2, 3), or (B, 3, 3) for a homography
        thetas = [theta]
        for iteration in range(1, self.config.num_iterations):
            moving = geometry.warp(sample, theta, padding_mode=self.config.padding_mode)  # (B, C, H, W)
            if moving_weights is not None:
                # The warp also leaves the cells it brings in from outside the sample without content.
                weighted = {"moving_weights": geometry.warp(moving_weights, theta, padding_mode="zeros")}
            theta = geometry.compose_theta(theta, self.localizer.step(moving, context, iteration, **weighted))
            thetas.append(theta)
        return thetas if return_intermediate else theta

    def forward(
        self,
        sample: torch.Tensor,
        reference: torch.Tensor | None = None,
        return_dict: bool = True,
        *,
        reference_weights: torch.Tensor | None = None,
    ) -> SpatialTransformerOutput | tuple:
        """Estimate θ and warp ``sample`` ``(B, C, H, W)`` with it (``reference_weights``: see
        :meth:`predict_theta`).

        Returns:
            :class:`SpatialTransformerOutput` (``sample`` ``(B, C, H, W)``, ``theta`` ``(B, 2, 3)`` or
            ``(B, 3, 3)`` for a homography), or the tuple ``(sample, theta)`` when ``return_dict=False``.
        """
        theta = self.predict_theta(sample, reference, reference_weights=reference_weights)
        warped = geometry.warp(sample, theta, padding_mode=self.config.padding_mode)
        if not return_dict:
            return (warped, theta)
        return SpatialTransformerOutput(sample=warped, theta=theta)
