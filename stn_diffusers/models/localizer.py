"""`Localizer`: the interface every localisation design of :class:`SpatialTransformer` implements.

A localiser turns latents into a residual θ, one cascade iteration at a time; the
:class:`~stn_diffusers.models.spatial_transformer.SpatialTransformer` around it validates inputs,
runs the cascade (warp by the θ so far, ask for the residual, compose) and warps the output. The
designs are :class:`~stn_diffusers.models.seed_localizer.SeedLocalizer`,
:class:`~stn_diffusers.models.correlation_localizer.CorrelationLocalizer` and
:class:`~stn_diffusers.models.search_refine_localizer.SearchRefineLocalizer`.

θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn as nn


def require_reference(conditioning: str, architecture: str) -> None:
    """A named error unless ``conditioning == "reference"``: a design that matches the sample against
    a reference cannot work without one."""
    if conditioning != "reference":
        raise ValueError(
            f"expected conditioning='reference' for architecture={architecture!r} (it matches the sample "
            f"against a reference), got {conditioning!r}"
        )


class Localizer(nn.Module, abc.ABC):
    """One localisation design: the learnable layers and the step that turns latents into θ.

    The submodules and parameters a localiser registers become the spatial transformer's own, under
    the same names: they are the keys of its saved weights.
    """

    #: Whether the design can give cells of the reference their own weight in the fit (the
    #: ``reference_weights`` of :meth:`prepare`); a design that reads the latents as a whole cannot.
    supports_reference_weights: bool = False
    #: Whether :meth:`step` takes ``moving_weights`` ``(B, 1, H, W)`` in ``[0, 1]``: which cells of the
    #: moving latents hold picture content (0 over the zero padding of an earlier warp).
    supports_moving_weights: bool = False

    @abc.abstractmethod
    def prepare(self, reference: torch.Tensor | None, reference_weights: torch.Tensor | None = None) -> Any:
        """What every iteration needs from the reference ``(B, C, H, W)`` (or ``None``), computed once.

        ``reference_weights`` ``(B, 1, H, W)`` in ``[0, 1]`` (1 = use the cell), only for a design with
        :attr:`supports_reference_weights`: how much each reference cell may count in the estimate.
        """

    @abc.abstractmethod
    def step(self, moving: torch.Tensor, context: Any, iteration: int) -> torch.Tensor:
        """The residual θ ``(B, 2, 3)``, or ``(B, 3, 3)`` for a homography, that aligns ``moving``
        ``(B, C, H, W)``, the sample warped by the θ of the iterations before ``iteration`` (0-based);
        ``context`` is :meth:`prepare`'s. One localiser returns one shape at every iteration. A design
        with :attr:`supports_moving_weights` also takes ``moving_weights=`` (see there)."""

    @abc.abstractmethod
    def head_parameters(self) -> list[nn.Parameter]:
        """The small parameters that turn features into θ; fine-tuning may give them a higher
        learning rate than the trunk."""

    @property
    @abc.abstractmethod
    def fixed_sample_size(self) -> int | None:
        """The only latent side this design accepts, or ``None`` for any side from :attr:`min_sample_size`."""

    @property
    @abc.abstractmethod
    def min_sample_size(self) -> int:
        """The smallest latent side this design accepts."""
