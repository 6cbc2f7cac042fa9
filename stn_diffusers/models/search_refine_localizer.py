"""`SearchRefineLocalizer`: a wide search over rotation and scale, then Gauss–Newton down to the finest grid.

1. **Features.** A small convolutional net maps the latents to ``feature_dim`` matching features at
   the latents' own resolution. Its first ``in_channels`` outputs start as the latents themselves and
   its residual branch starts at zero, so the untrained design aligns the raw latents; training
   learns what aligns better (features that change less under rotation, brightness or a VAE's
   non-equivariance).
2. **Search** (:mod:`stn_diffusers.similarity_search`). On the features pooled by ``search_stride``,
   every candidate rotation (``±search_rotation`` in steps of ``search_rotation_step`` degrees) and
   scale (``search_scale^±1`` in steps of ``search_scale_step``) is tried at every shift within
   ``search_translation`` of the side. A rotation of 40° is one candidate among others rather than a
   motion a network must have learned to undo, which is what makes the basin wide.
3. **Refinement** (:mod:`stn_diffusers.gauss_newton`). Robust Gauss–Newton on the features pooled by
   each of ``refine_strides`` in turn, ``refine_iterations`` steps each in training (at inference up
   to ``inference_refine_iterations``, a level stopping once converged), down to stride 1 (the latent
   grid), with sub-cell precision. Brightness and contrast are matched on the overlap at each step.
   At inference the first ``inference_shear_free_steps`` of each level fit no shear (rotation, a
   scale per axis and a shift): a coarse or smooth map barely constrains a shear, and a shear fitted
   there from a search candidate can run off to a squashed view of a smooth region.
4. **Aligned pairs stay put.** At inference the answer is weighed against the identity by a robust
   residual (:func:`~stn_diffusers.gauss_newton.compare_with_identity`: the median cell residual, so
   up to half of the picture may change without moving the pair); unless the answer fits clearly
   better, and its scales and shift lie within the searched range (with a margin), the pair comes
   back exactly unwarped. In training mode the refined answer is
   always returned, so every pair trains the features.

With ``search_both_ways`` (on by default for homographies), inference also aligns the reference onto
the moving image and keeps the inverse of that answer when its median cell residual is lower: the
search and Gauss–Newton can find a view one way round and miss it the other (OpenCV's graffiti pair:
3 px one way, 281 px the other before).

Reference weights (an ignore mask) weight the search score and every Gauss–Newton residual. Moving
weights mark the moving latents' content: cells over the zero padding of an earlier warp (a rotated
photo's black corners) count as uncovered, in the search and in every refinement step, so a padded
border is not matched against picture content.

θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import gauss_newton, geometry, similarity_search
from .localizer import Localizer, require_reference

# The search grid needs a few cells per side to tell rotations apart.
MIN_SEARCH_CELLS = 4
# An answer must have a median cell residual this share below the identity's to move a pair (see
# gauss_newton.compare_with_identity): a refinement always fits a little better by fitting noise, a
# large local change on a low-texture photo can be matched by a zoom into the sky, and an aligned
# pair must still come back unwarped. Chosen on held-out zero-motion pairs with a 20 % local change
# (all kept) against `standard`, `large` and `huge` pairs (none lost); see benchmarks/RESULTS.md.
IDENTITY_MARGIN = 0.4
# A Gauss–Newton level stops at inference once a step moves no entry of θ by more than this
# (normalised units: 0.08 px at 512 px), far below the latent floor.
CONVERGED = 3e-4
# An answer that leaves less than this share of the reference covered is not trusted over the identity.
MIN_SHARED_CELLS = 0.3
# An affine answer whose scales or shift lie beyond the searched range by more than this factor is not
# trusted over the identity: the search never proposed it and training never showed it, and on
# smooth photos such answers are squashed, sheared views that match a featureless region (held-out
# aligned pairs with a local change moved by 150–380 px; no answer within 5 px of the truth, on
# any warp range, lies beyond it).
PLAUSIBLE_MARGIN = 1.15
# Transforms this design fits (Gauss–Newton parameterises the full affine and projective families).
SEARCH_REFINE_TRANSFORMS = ("affine", "homography")


class MatchingFeatures(nn.Module):
    """Latents ``(B, C, H, W)`` → matching features ``(B, feature_dim, H, W)`` at the same resolution.

    ``features = pad(latents) + residual(latents)``: the latents fill the first ``C`` channels and a
    zero-initialised residual branch adds what training learns. The branch is pointwise (1×1
    convolutions): it costs little, and a pointwise map commutes with any warp, so the features of a
    rotated photo are the rotated features, which the search relies on.
    """

    def __init__(self, in_channels: int, hidden_channels: int, feature_dim: int):
        super().__init__()
        if feature_dim < in_channels:
            raise ValueError(f"expected feature_dim >= in_channels ({in_channels}), got {feature_dim}")
        self.in_channels = in_channels
        self.feature_dim = feature_dim
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 1),
            nn.SiLU(),
            nn.Conv2d(hidden_channels, feature_dim, 1),
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        passthrough = F.pad(latents, (0, 0, 0, 0, 0, self.feature_dim - self.in_channels))
        return passthrough + self.residual(latents)


def pool(features: torch.Tensor, stride: int) -> torch.Tensor:
    """``(B, D, H, W)`` averaged over ``stride × stride`` cells (``⌈H / stride⌉`` per side, edges included)."""
    if stride == 1:
        return features
    return F.avg_pool2d(features, stride, ceil_mode=True)


def pool_content(weights: torch.Tensor | None, stride: int) -> torch.Tensor | None:
    """Content weights ``(B, 1, H, W)`` on the ``stride`` grid, by their minimum: a pooled cell holds
    content only if every cell it averages does (a partly padded cell's average is not the picture's)."""
    if weights is None or stride == 1:
        return weights
    return -F.max_pool2d(-weights, stride, ceil_mode=True)


@dataclass
class SearchRefineContext:
    """The reference, prepared once: features at the search stride and each refinement stride.

    Args:
        search: ``(B, D, h, w)`` standardised features at the search stride.
        search_weights: ``(B, 1, h, w)`` reference weights there, or ``None``.
        levels: ``{stride: LinearisedReference}`` for each refinement stride.
        weights: ``(B, 1, H, W)`` reference weights at the latents' size, or ``None``.
    """

    search: torch.Tensor
    search_weights: torch.Tensor | None
    levels: dict[int, gauss_newton.LinearisedReference]
    weights: torch.Tensor | None


def _identity_like(theta: torch.Tensor) -> torch.Tensor:
    """The identity in ``theta``'s shape, ``(B, 2, 3)`` or ``(B, 3, 3)``."""
    identity = geometry.identity_theta(theta.shape[0], theta.device, theta.dtype)
    return geometry.to_homogeneous(identity) if geometry.is_homography(theta) else identity


def _ranking_cost(finite: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """``cost`` ``(B,)`` for ranking two answers: infinite where θ is not finite or the cost is not."""
    return torch.where(finite & torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))


class SearchRefineLocalizer(Localizer):
    """Search over rotation, scale and shift, then robust Gauss–Newton refinement (see the module).

    Args:
        in_channels: latent channels of the VAE.
        conditioning: must be ``"reference"``.
        transform: ``"affine"`` (θ ``(B, 2, 3)``) or ``"homography"`` (θ ``(B, 3, 3)``; the search
            stays a similarity and the finest refinement stride fits the homography).
        feature_channels: ``(hidden,)``: the width of the feature net's hidden layer (only the
            first entry is read).
        feature_dim: number of matching features (at least ``in_channels``).
        search_stride, search_rotation, search_rotation_step, search_scale, search_scale_step,
            search_translation: the search grid and its candidates (see the module).
        search_candidates: the best candidates of the search (distinct rotations or scales) each
            refined at the coarsest level; the one that fits best there goes on.
        refine_strides: pooling of the features at each refinement level, coarse to fine, ending at 1.
        refine_iterations: Gauss–Newton steps at each refinement level in training (all taken).
        inference_refine_iterations: the most steps at each level at inference, where a level stops
            once converged (default: ``refine_iterations``). Training unrolls fewer steps than
            inference allows, as iterative estimators such as RAFT do: backpropagating through every
            step costs memory and time, and the features learnt for a few steps serve more.
        search_both_ways: at inference, also align the reference onto the moving image and keep the
            inverse of that answer when it fits better (twice the cost). A viewpoint change that
            foreshortens the moving image beyond the searched scales is inside them the other way
            round. Default (``None``): on for ``transform="homography"``, off for ``"affine"``.
        inference_shear_free_steps: at inference, how many of each level's first Gauss–Newton steps
            fit no shear (see the module; default: none). Training fits every step in full.
    """

    supports_reference_weights = True
    supports_moving_weights = True

    def __init__(
        self,
        in_channels: int,
        conditioning: str,
        transform: str,
        feature_channels: tuple[int, ...],
        feature_dim: int,
        search_stride: int,
        search_rotation: float,
        search_rotation_step: float,
        search_scale: float,
        search_scale_step: float,
        search_translation: float,
        search_candidates: int,
        refine_strides: tuple[int, ...],
        refine_iterations: tuple[int, ...],
        inference_refine_iterations: tuple[int, ...] | None = None,
        search_both_ways: bool | None = None,
        inference_shear_free_steps: tuple[int, ...] | None = None,
    ):
        super().__init__()
        require_reference(conditioning, "search_refine")
        if transform not in SEARCH_REFINE_TRANSFORMS:
            raise ValueError(
                f"expected transform in {SEARCH_REFINE_TRANSFORMS} for architecture='search_refine', got {transform!r}"
            )
        refine_strides, refine_iterations = tuple(refine_strides), tuple(refine_iterations)
        if not refine_strides or refine_strides[-1] != 1 or any(s < 1 for s in refine_strides):
            raise ValueError(f"expected refine_strides of positive strides ending at 1, got {refine_strides}")
        if len(refine_iterations) != len(refine_strides) or min(refine_iterations) < 1:
            raise ValueError(
                f"expected one refine_iterations entry >= 1 per refine stride ({len(refine_strides)}), "
                f"got {refine_iterations}"
            )
        if inference_refine_iterations is None:
            inference_refine_iterations = refine_iterations
        inference_refine_iterations = tuple(inference_refine_iterations)
        if len(inference_refine_iterations) != len(refine_strides) or min(inference_refine_iterations) < 1:
            raise ValueError(
                f"expected one inference_refine_iterations entry >= 1 per refine stride ({len(refine_strides)}), "
                f"got {inference_refine_iterations}"
            )
        if inference_shear_free_steps is None:
            inference_shear_free_steps = (0,) * len(refine_strides)
        inference_shear_free_steps = tuple(inference_shear_free_steps)
        if len(inference_shear_free_steps) != len(refine_strides) or min(inference_shear_free_steps) < 0:
            raise ValueError(
                f"expected one inference_shear_free_steps entry >= 0 per refine stride ({len(refine_strides)}), "
                f"got {inference_shear_free_steps}"
            )
        if search_candidates < 1:
            raise ValueError(f"expected search_candidates >= 1, got {search_candidates}")
        if search_stride < 1 or search_rotation < 0 or search_rotation_step <= 0:
            raise ValueError(
                "expected search_stride >= 1, search_rotation >= 0 and search_rotation_step > 0, got "
                f"{search_stride}, {search_rotation} and {search_rotation_step}"
            )
        if search_scale < 1 or search_scale_step <= 1 or not 0 <= search_translation < 1:
            raise ValueError(
                "expected search_scale >= 1, search_scale_step > 1 and search_translation in [0, 1), got "
                f"{search_scale}, {search_scale_step} and {search_translation}"
            )
        self.transform = transform
        self.search_stride = int(search_stride)
        self.search_translation = float(search_translation)
        self.search_candidates = int(search_candidates)
        self.refine_strides = refine_strides
        self.refine_iterations = refine_iterations
        self.inference_refine_iterations = inference_refine_iterations
        self.inference_shear_free_steps = inference_shear_free_steps
        self.search_both_ways = transform == "homography" if search_both_ways is None else bool(search_both_ways)
        self.localization = MatchingFeatures(in_channels, int(feature_channels[0]), int(feature_dim))
        self.register_buffer(
            "search_rotations",
            similarity_search.default_rotations(search_rotation, search_rotation_step),
            persistent=False,
        )
        self.register_buffer(
            "search_scales", similarity_search.default_scales(search_scale, search_scale_step), persistent=False
        )
        self.search_scale = float(search_scale)  # the searched scales span search_scale^±1

    # ------------------------------------------------------------------------------------ context
    def _level_transform(self, stride: int) -> str:
        # A homography's extra two parameters are poorly constrained on coarse grids: only the finest fits them.
        return "homography" if self.transform == "homography" and stride == 1 else "affine"

    def prepare(self, reference: torch.Tensor, reference_weights: torch.Tensor | None = None) -> SearchRefineContext:
        """Reference features at the search stride and every refinement stride, linearised once
        (the reference never moves); ``reference_weights`` ``(B, 1, H, W)`` pooled to each grid."""
        return self._prepare_features(self.localization(reference), reference_weights)

    def _prepare_features(self, features: torch.Tensor, reference_weights: torch.Tensor | None) -> SearchRefineContext:
        """:meth:`prepare` from the reference's features ``(B, D, H, W)``."""
        weights = None if reference_weights is None else reference_weights.to(features.dtype)
        search_weights = None if weights is None else pool(weights, self.search_stride)
        search = similarity_search.standardise(pool(features, self.search_stride), search_weights)
        levels = {
            stride: gauss_newton.linearise_reference(
                pool(features, stride),
                self._level_transform(stride),
                None if weights is None else pool(weights, stride),
            )
            for stride in self.refine_strides
        }
        return SearchRefineContext(search, search_weights, levels, weights)

    # --------------------------------------------------------------------------------------- step
    def _search_radius(self, height: int, width: int) -> int:
        # A shift of the warped grid moves the moving map by L·s: the smallest scale needs the most cells.
        return math.ceil(self.search_translation * max(height, width) * self.search_scale) + 1

    def _refine(
        self,
        context: SearchRefineContext,
        moving: torch.Tensor,
        theta: torch.Tensor,
        first_level: int = 0,
        moving_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gauss–Newton at each refinement stride from ``first_level`` on, coarse to fine."""
        levels = list(zip(self.refine_strides, self._iterations(), self._shear_free_steps()))[first_level:]
        for stride, iterations, shear_free_steps in levels:
            # Coarse levels are not reweighted: far from the answer every residual is large, and
            # downweighting them slows the approach; the finest level is, against local changes.
            theta = gauss_newton.refine(
                context.levels[stride],
                pool(moving, stride),
                theta,
                iterations,
                robust=stride == 1,
                tolerance=self._tolerance(),
                moving_weights=pool_content(moving_weights, stride),
                shear_free_steps=shear_free_steps,
                native=not self.training,
            )
        return theta

    def _iterations(self) -> tuple[int, ...]:
        return self.refine_iterations if self.training else self.inference_refine_iterations

    def _shear_free_steps(self) -> tuple[int, ...]:
        return (0,) * len(self.refine_strides) if self.training else self.inference_shear_free_steps

    def _tolerance(self) -> float:
        # At inference a level stops once its steps no longer move θ; training takes every step.
        return 0.0 if self.training else CONVERGED

    def _select(
        self,
        context: SearchRefineContext,
        features: torch.Tensor,
        starts: torch.Tensor,
        moving_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The best of ``starts`` ``(B, k, 2, 3)`` after the coarsest refinement level, ``(B, 2, 3)``.

        The search scores whole candidates on a coarse grid, where the true rotation and a wrong one
        can score alike on smooth photos; a few Gauss–Newton steps pull the true one much closer, and
        the cost after them tells the two apart. The cost is the identity test's median cell residual
        (:func:`~stn_diffusers.gauss_newton.compare_with_identity`): a mean, even a capped one, lets a
        wrong zoom into a smooth region beat the truth whose overlap is partly uncovered.
        """
        batch, count = starts.shape[:2]
        stride, iterations = self.refine_strides[0], self._iterations()[0]
        level = gauss_newton.repeat_linearised(context.levels[stride], count)
        moving = pool(features, stride).repeat_interleave(count, dim=0)
        content = pool_content(moving_weights, stride)
        content = None if content is None else content.repeat_interleave(count, dim=0)
        refined = gauss_newton.refine(
            level, moving, starts.flatten(0, 1), iterations, robust=False, moving_weights=content,
            shear_free_steps=self._shear_free_steps()[0], native=not self.training,
        )  # fmt: skip
        cost = gauss_newton.compare_with_identity(level, moving, refined, content, native=not self.training)[0]
        cost = cost.view(batch, count)
        cost = torch.where(torch.isfinite(cost), cost, torch.full_like(cost, float("inf")))
        best = cost.argmin(dim=1)
        return refined.view(batch, count, *refined.shape[1:])[torch.arange(batch), best]

    def _estimate(
        self, context: SearchRefineContext, features: torch.Tensor, moving_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """θ aligning the moving ``features`` ``(B, D, H, W)`` onto ``context``: search, selection and
        refinement, before the identity test."""
        with torch.no_grad():
            searched = pool(features, self.search_stride)
            search_content = pool_content(moving_weights, self.search_stride)
            # Statistics over the moving map's own content when it is known: padding would skew them.
            searched = similarity_search.standardise(
                searched, context.search_weights if search_content is None else search_content
            )
            start, _ = similarity_search.search_similarity(
                context.search,
                searched,
                self.search_rotations,
                self.search_scales,
                self._search_radius(*searched.shape[-2:]),
                context.search_weights,
                top_k=self.search_candidates,
                moving_weights=search_content,
            )
            if self.search_candidates > 1:
                start = self._select(context, features, start.to(features.dtype), moving_weights)
        start = start.to(features.dtype)
        if self.training or self.search_candidates == 1:
            # Training refines the selected candidate again through every level, the coarsest
            # included (the selection ran without gradient), so the features learn every level;
            # inference goes on from the selection's coarsest level.
            return self._refine(context, features, start, moving_weights=moving_weights)
        return self._refine(context, features, start, first_level=1, moving_weights=moving_weights)

    def _reverse(
        self, context: SearchRefineContext, features: torch.Tensor, moving_weights: torch.Tensor | None
    ) -> torch.Tensor:
        """The inverse of the reference aligned onto the moving ``features`` (``search_both_ways``): a
        view that foreshortens or shrinks the moving image beyond the searched scales is inside them
        the other way round."""
        reverse_context = self._prepare_features(features, moving_weights)
        # The reference's features (stride 1 is always a level) move; its weights mark what it keeps.
        return geometry.invert_theta(self._estimate(reverse_context, context.levels[1].features, context.weights))

    def _judge(
        self,
        context: SearchRefineContext,
        features: torch.Tensor,
        theta: torch.Tensor,
        moving_weights: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The identity test's view of θ, each ``(B,)``: whether θ is finite, then
        :func:`~stn_diffusers.gauss_newton.compare_with_identity`'s answer cost, identity cost and shared
        cover, and whether θ is plausible (:meth:`_plausible`); a θ that is not finite is judged as
        the identity."""
        finite = torch.isfinite(theta).flatten(1).all(dim=1)
        safe = torch.where(finite.view(-1, 1, 1), theta, _identity_like(theta))
        answer_cost, identity_cost, shared = gauss_newton.compare_with_identity(
            context.levels[1], features, safe, moving_weights, native=not self.training
        )
        return finite, answer_cost, identity_cost, shared, self._plausible(safe, *features.shape[-2:])

    def _plausible(self, theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``(B,)`` True where θ ``(B, 2, 3)`` stays within the searched scales and shifts widened by
        :data:`PLAUSIBLE_MARGIN`: both singular values of its linear part, in pixel units of an
        ``h × w`` grid, within ``search_scale^±1``, and its shift within the shifts the search reaches
        at the smallest scale.

        Affine STNs only: a viewpoint change foreshortens far beyond any scale range (OpenCV's
        graffiti pair), so every finite homography is plausible.
        """
        if self.transform == "homography":
            return torch.ones(theta.shape[0], dtype=torch.bool, device=theta.device)
        linear = geometry.pixel_linear_part(theta.double(), height, width)  # pixel units
        scales = geometry.singular_values_2x2(linear)  # (B, 2), largest first
        scale_bound = self.search_scale * PLAUSIBLE_MARGIN
        shift_bound = 2.0 * self.search_translation * self.search_scale * PLAUSIBLE_MARGIN
        shift = theta[:, :, 2].abs().amax(dim=1)
        return (scales[:, 0] <= scale_bound) & (scales[:, 1] >= 1.0 / scale_bound) & (shift <= shift_bound)

    def step(
        self,
        moving: torch.Tensor,
        context: SearchRefineContext,
        iteration: int,
        moving_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """θ ``(B, 2, 3)`` (``(B, 3, 3)`` for a homography) aligning ``moving`` ``(B, C, H, W)``: search
        (first iteration only) and refinement, with the identity kept when it fits better.
        ``moving_weights`` ``(B, 1, H, W)``: the moving latents' content (see the module)."""
        features = self.localization(moving)  # (B, D, H, W)
        batch = features.shape[0]
        identity = geometry.identity_theta(batch, features.device, features.dtype)
        if iteration > 0:
            # A later cascade iteration sees the sample already aligned: refine, no new search.
            return self._refine(context, features, identity, moving_weights=moving_weights)
        theta = self._estimate(context, features, moving_weights)
        if self.training:
            # Every pair trains the features through the refinement; the identity test decides at inference.
            return theta
        with torch.no_grad():
            finite, answer_cost, identity_cost, shared, plausible = self._judge(
                context, features, theta, moving_weights
            )
            if self.search_both_ways:
                # The reverse answer where its median residual is lower (the identity's cost is the same).
                other = self._reverse(context, features, moving_weights)
                other_finite, other_cost, _, other_shared, other_plausible = self._judge(
                    context, features, other, moving_weights
                )
                better = _ranking_cost(other_finite, other_cost) < _ranking_cost(finite, answer_cost)
                theta = torch.where(better.view(batch, 1, 1), other, theta)
                finite = torch.where(better, other_finite, finite)
                answer_cost = torch.where(better, other_cost, answer_cost)
                shared = torch.where(better, other_shared, shared)
                plausible = torch.where(better, other_plausible, plausible)
            # Aligned pairs stay put: the identity wins unless the answer fits clearly better. A diverged
            # refinement (a non-finite θ) and an answer beyond the searched range fall back to it too.
            keep_identity = (
                (answer_cost >= (1 - IDENTITY_MARGIN) * identity_cost)
                | ~finite
                | (shared < MIN_SHARED_CELLS)
                | ~plausible
            )
        return torch.where(keep_identity.view(batch, 1, 1), _identity_like(theta), theta)

    def head_parameters(self) -> list[nn.Parameter]:
        """The last layer of the feature net (zero at initialisation)."""
        return list(self.localization.residual[-1].parameters())

    @property
    def fixed_sample_size(self) -> None:
        return None

    @property
    def min_sample_size(self) -> int:
        return MIN_SEARCH_CELLS * self.search_stride
