"""Compositional Gauss–Newton alignment of feature maps: the sub-cell refinement of the
search-refine design. Pure functions, no modules; differentiable, so the features feeding it train
through it.

The reference never moves: its gradients and the Jacobian of the motion are computed once per level
(:func:`linearise_reference`); each iteration warps the moving map, adds its gradients (the efficient
second-order form, see :func:`gauss_newton_step`) and solves a 6×6 (8×8 for a homography) system. Residuals
are weighted robustly (a Cauchy weight on each cell's residual, scaled by the median residual) so a
moving object or a pasted region does not drag the fit, and cells the warp exposes (padding) or the
caller ignores (``reference_weights``) take no part. A step may be held to the shear-free motions
(rotation, a scale per axis and a shift: :func:`shear_free_basis`), which a coarse or smooth map
constrains far better than a shear.

At inference, :func:`refine` and :func:`compare_with_identity` can hand an affine float32 CPU
problem to ``stn_diffusers._speedups``, the same arithmetic in C (an optional build, see
``setup.py``); training and every other case run the PyTorch code here, whose arithmetic is kept
as it trained the shipped weights (a change of rounding here trains a different STN).

θ follows the convention in :mod:`stn_diffusers.geometry`: ``warp(moving, θ) ≈ reference``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import geometry

try:  # the optional C build of an affine level (setup.py); where it is missing, the PyTorch step serves
    from . import _speedups
except ImportError:  # pragma: no cover - depends on the install
    _speedups = None

# Levenberg–Marquardt damping, relative to the diagonal of the Gauss–Newton matrix: keeps a step
# on a flat (textureless) map small instead of huge.
DAMPING = 1e-3
# Cauchy weight 1 / (1 + r² / (c² · median r²)): residuals a few times the typical one count little.
ROBUST_SCALE = 2.0
# A cell samples the moving map's content when the bilinearly sampled moving weight reaches this:
# every latent cell it reads is content, none is padding.
CONTENT_LEVEL = 0.999


def cell_grid(height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised cell-centre coordinates ``x, y`` of an ``h × w`` grid (align_corners=False), ``(h·w,)`` each."""
    ys = (torch.arange(height, device=like.device, dtype=like.dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=like.device, dtype=like.dtype) * 2 + 1) / width - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return grid_x.flatten(), grid_y.flatten()


def spatial_gradients(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of ``(B, D, h, w)`` per normalised unit (one cell spans ``2 / w``), ``(B, D, h, w)`` × 2."""
    height, width = features.shape[-2:]
    padded = F.pad(features, (1, 1, 1, 1), mode="replicate")
    grad_x = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) * (width / 4.0)
    grad_y = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) * (height / 4.0)
    return grad_x, grad_y


def motion_jacobian(height: int, width: int, transform: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∂(warped x)/∂p and ∂(warped y)/∂p at p = 0 for each cell, ``(h·w, P)`` × 2 (P = 6 affine, 8 homography).

    The parameters add to the identity matrix row by row: ``[[1 + p0, p1, p2], [p3, 1 + p4, p5], [p6, p7, 1]]``.
    """
    x, y = cell_grid(height, width, like)
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    jac_x = [x, y, ones, zeros, zeros, zeros]
    jac_y = [zeros, zeros, zeros, x, y, ones]
    if transform == "homography":
        jac_x += [-x * x, -x * y]
        jac_y += [-x * y, -y * y]
    return torch.stack(jac_x, -1), torch.stack(jac_y, -1)


@functools.lru_cache(maxsize=32)
def shear_free_basis(
    height: int, width: int, num_params: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(P, 5)``: the step parameters (:func:`params_to_matrix`, ``P`` = 6 or 8) of a shear-free motion
    ``(sx, sy, r, tx, ty)`` on an ``h × w`` grid: a scale step per axis, a rotation step and a shift.

    In normalised units a rotation mixes the axes by the aspect ratio ``a = w / h``: its generator is
    ``[[0, -1/a], [a, 0]]``; the shear left out is ``[[0, 1/a], [a, 0]]``. Never modified in place.
    """
    with torch.inference_mode(False), torch.no_grad():  # reusable by a later training step (see _motion_basis)
        aspect = width / height
        basis = torch.zeros(num_params, 5, dtype=torch.float64, device=device)
        basis[0, 0] = basis[4, 1] = 1.0  # scale steps of x and y
        basis[1, 2], basis[3, 2] = -1.0 / aspect, aspect  # rotation step
        basis[2, 3] = basis[5, 4] = 1.0  # shift
        return basis.to(dtype)


def params_to_matrix(params: torch.Tensor) -> torch.Tensor:
    """``(B, 6)`` or ``(B, 8)`` → the step's motion ``(B, 3, 3)``: the identity plus ``params`` row by row
    (an affine step's last row stays ``[0, 0, 1]``)."""
    batch = params.shape[0]
    full = F.pad(params, (0, 9 - params.shape[1])).view(batch, 3, 3)
    return full + torch.eye(3, device=params.device, dtype=params.dtype)


@dataclass
class LinearisedReference:
    """What every Gauss–Newton iteration reads from the reference at one level, computed once.

    Args:
        features: ``(B, D, h, w)`` the reference's features.
        grad_x, grad_y: ``(B, D, h·w)`` their spatial gradients per normalised unit.
        jacobian: ``(2·h·w, P)`` ∂(warped x)/∂p for every cell, then ∂(warped y)/∂p.
        monomials: ``(h·w, K)`` the cell coordinates' monomials ``xⁱ yʲ`` up to degree 2 (affine) or
            4 (homography); ``assemble``: ``(3·K, P·P)``. Per cell, ``Jxᵀ Jx``, ``Jxᵀ Jy + Jyᵀ Jx`` and
            ``Jyᵀ Jy`` are polynomials in the coordinates, so the Gauss–Newton matrix is the structure
            tensors' moments against the monomials, ``(3, K)`` per pair, times ``assemble``: far fewer
            products than summing the ``P × P`` matrices cell by cell.
        weights: ``(B, h·w)`` in ``[0, 1]``, each cell's share (1 when no cell is ignored).
    """

    features: torch.Tensor
    grad_x: torch.Tensor
    grad_y: torch.Tensor
    jacobian: torch.Tensor
    monomials: torch.Tensor
    assemble: torch.Tensor
    weights: torch.Tensor

    @property
    def num_params(self) -> int:
        return self.jacobian.shape[-1]


def match_statistics(
    moving: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """``moving`` ``(B, D, h, w)`` with each channel's mean and spread over the ``weights`` ``(B, 1, h, w)``
    cells set to the reference's there: a change of brightness or contrast is not mistaken for motion."""
    total = weights.sum(dim=(2, 3), keepdim=True).clamp_min(eps)
    with torch.no_grad():
        # Both maps' statistics in one pass: (2, B, D, 1, 1) means and spreads.
        both = torch.stack([moving.detach(), reference.detach()])
        mean = (both * weights).sum(dim=(3, 4), keepdim=True) / total
        spread = ((((both - mean) ** 2) * weights).sum(dim=(3, 4), keepdim=True) / total + eps).sqrt()
    return (moving - mean[0]) * (spread[1] / spread[0]) + mean[1]


def _flat_gradients(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_y = spatial_gradients(features)
    return grad_x.flatten(2), grad_y.flatten(2)  # (B, D, N) each


@functools.lru_cache(maxsize=32)
def _motion_basis(
    height: int, width: int, transform: str, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``jacobian``, ``monomials`` and ``assemble`` of :class:`LinearisedReference`: they depend
    on the grid alone, so one pair after another reuses them. Never modified in place."""
    # Normal tensors even when first asked for under inference mode: a cached inference tensor could
    # not take part in a later training step.
    with torch.inference_mode(False), torch.no_grad():
        jac_x, jac_y = motion_jacobian(height, width, transform, torch.empty(0, dtype=torch.float64, device=device))
        outer = lambda a, b: (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(1)  # noqa: E731  (N, P·P)
        products = torch.stack([outer(jac_x, jac_x), outer(jac_x, jac_y) + outer(jac_y, jac_x), outer(jac_y, jac_y)])
        x, y = cell_grid(height, width, jac_x)
        degree = 4 if transform == "homography" else 2
        monomials = torch.stack([x**i * y**j for i in range(degree + 1) for j in range(degree + 1 - i)], dim=-1)
        # Exact: each product is a polynomial of at most that degree (least squares only finds its coefficients).
        assemble = torch.linalg.lstsq(monomials.expand(3, -1, -1), products).solution  # (3, K, P·P)
        jacobian = torch.cat([jac_x, jac_y])
        return jacobian.to(dtype), monomials.to(dtype), assemble.flatten(0, 1).to(dtype)


def linearise_reference(
    reference: torch.Tensor, transform: str = "affine", reference_weights: torch.Tensor | None = None
) -> LinearisedReference:
    """The reference ``(B, D, h, w)`` linearised for :func:`gauss_newton_step` (``transform``:
    ``"affine"`` or ``"homography"``); ``reference_weights`` ``(B, 1, h, w)`` in ``[0, 1]``."""
    batch, channels, height, width = reference.shape
    jacobian, monomials, assemble = _motion_basis(height, width, transform, reference.dtype, reference.device)
    if reference_weights is None:
        weights = reference.new_ones(batch, height * width)
    else:
        weights = reference_weights.flatten(1).to(reference.dtype)
    grad_x, grad_y = _flat_gradients(reference)
    return LinearisedReference(reference, grad_x, grad_y, jacobian, monomials, assemble, weights)


@functools.lru_cache(maxsize=32)
def _cell_positions(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Homogeneous cell centres ``[x, y, 1]`` of an ``h × w`` grid, ``(h·w, 3)``: what ``F.affine_grid``
    rebuilds on every call, kept once per grid (the refinement samples the same grid many times)."""
    with torch.inference_mode(False), torch.no_grad():  # reusable by a later training step (see _motion_basis)
        x, y = cell_grid(height, width, torch.empty(0, dtype=dtype, device=device))
        return torch.stack([x, y, torch.ones_like(x)], dim=-1)


@functools.lru_cache(maxsize=32)
def _coverage_limit(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(2,)`` the largest ``|x|, |y|`` a sample may have and read no pixel outside an ``h × w`` map
    (the outermost cell centres, with a little slack for rounding)."""
    with torch.inference_mode(False), torch.no_grad():  # reusable by a later training step (see _motion_basis)
        return torch.tensor([1.0 - 1.0 / width + 1e-6, 1.0 - 1.0 / height + 1e-6], dtype=dtype, device=device)


def sampling_grid(theta: torch.Tensor, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``(B, h, w, 2)`` positions θ samples for an ``h × w`` output (affine or homography); for an
    affine θ the same as ``F.affine_grid(θ, …, align_corners=False)``."""
    batch = theta.shape[0]
    positions = _cell_positions(height, width, like.dtype, like.device)
    theta = theta.to(like.dtype)
    if not geometry.is_homography(theta):
        return (positions @ theta.transpose(1, 2)).view(batch, height, width, 2)
    return geometry.apply_theta(theta, positions[:, :2].expand(batch, -1, -1)).view(batch, height, width, 2)


def with_content(moving: torch.Tensor, moving_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, D + 1, h, w)``: ``moving`` ``(B, D, h, w)`` with its content plane as a last channel
    (``moving_weights`` ``(B, 1, h, w)``, or ones). Warped together with zero padding, the sampled plane
    is below 1 wherever bilinear sampling reads outside the map or over its padding."""
    content = torch.ones_like(moving[:, :1]) if moving_weights is None else moving_weights.to(moving.dtype)
    return torch.cat([moving, content], dim=1)


def _warp_and_match(
    linearised: LinearisedReference,
    moving: torch.Tensor,
    theta: torch.Tensor | None,
    moving_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``warp(moving, θ)`` brightness-matched to the reference, ``(B, D, h, w)``, and the covered
    reference weights ``(B, N)`` (0 where padding enters); ``θ = None`` is the identity.

    ``moving_weights`` ``(B, 1, h, w)`` in ``[0, 1]`` mark the moving map's own content: a cell that
    samples where they are below 1 (zero padding inside the moving image) is not covered either.
    """
    reference = linearised.features
    batch, channels, height, width = reference.shape
    if theta is None:
        # The identity samples every cell at its centre: the map itself, every cell covered.
        warped, covered, content = moving, None, moving_weights
    else:
        grid = sampling_grid(theta, height, width, moving)  # (B, h, w, 2)
        warped = F.grid_sample(moving, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        with torch.no_grad():
            # A cell is covered when every pixel bilinear sampling reads lies inside the moving map.
            limit = _coverage_limit(height, width, grid.dtype, grid.device)
            covered = (grid.abs() <= limit).all(dim=-1).flatten(1).to(reference.dtype)  # (B, N)
            content = None
            if moving_weights is not None:
                content = F.grid_sample(moving_weights.to(grid.dtype), grid, padding_mode="zeros", align_corners=False)
    with torch.no_grad():
        # The weights decide which cells count, not how the answer moves: no gradient through them.
        weights = linearised.weights if covered is None else covered * linearised.weights
        if content is not None:
            weights = weights * (content.flatten(1) >= CONTENT_LEVEL).to(reference.dtype)
    return match_statistics(warped, reference, weights.view(batch, 1, height, width)), weights


def repeat_linearised(linearised: LinearisedReference, repeats: int) -> LinearisedReference:
    """Each pair's linearised reference repeated ``repeats`` times along the batch (``repeat_interleave``):
    several candidates of one pair refined as one batch."""
    if repeats == 1:
        return linearised
    per_pair = {
        name: getattr(linearised, name).repeat_interleave(repeats, dim=0)
        for name in ("features", "grad_x", "grad_y", "weights")
    }
    shared = {name: getattr(linearised, name) for name in ("jacobian", "monomials", "assemble")}
    return LinearisedReference(**shared, **per_pair)


def compare_with_identity(
    linearised: LinearisedReference,
    moving: torch.Tensor,
    theta: torch.Tensor,
    moving_weights: torch.Tensor | None = None,
    native: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robust costs ``(B,)`` of ``warp(moving, θ)`` and of the unwarped ``moving`` against the
    reference, and the share ``(B,)`` of the reference's weight that both cover.

    A cost is the median over the reference's cells (those of weight > 0) of each cell's squared
    residual: up to half of the picture may change (a moved object, a pasted patch, an edit) without
    moving it. A cell the answer leaves uncovered counts what it counts for the identity, so an
    answer gains nothing by looking away from a region it cannot explain, and loses nothing for the
    corners a true rotation leaves uncovered. Cells the identity sees as the moving image's padding
    (``moving_weights``) take no part: neither candidate can explain them.

    With ``native``, the comparison runs in C where :func:`native_step_applies` (see :func:`refine`).
    """
    stacked = _native_input(linearised, moving, moving_weights, theta) if native else None
    if stacked is not None:
        return _native_compare(linearised, stacked, theta)
    residuals, covered = {}, {}
    for name, candidate in (("answer", theta), ("identity", None)):
        warped, weights = _warp_and_match(linearised, moving, candidate, moving_weights)
        residuals[name] = (warped - linearised.features).flatten(2).pow(2).mean(dim=1)  # (B, N)
        covered[name] = weights > 0
    # The identity covers every cell of weight > 0 but the moving image's padding: the cells both costs use.
    used = covered["identity"]
    seen = used & covered["answer"]
    answer = torch.where(seen, residuals["answer"], residuals["identity"])
    nan = torch.full_like(answer, float("nan"))
    answer_cost, identity_cost = (
        torch.where(used, cells, nan).nanmedian(dim=1).values for cells in (answer, residuals["identity"])
    )
    share = (seen * linearised.weights).sum(dim=1) / linearised.weights.sum(dim=1).clamp_min(1e-12)
    return answer_cost, identity_cost, share


def gauss_newton_step(
    linearised: LinearisedReference,
    moving: torch.Tensor,
    theta: torch.Tensor,
    robust: bool = True,
    moving_weights: torch.Tensor | None = None,
    shear_free: bool = False,
) -> torch.Tensor:
    """One Gauss–Newton step: θ ``(B, 2, 3)`` or ``(B, 3, 3)`` → the refined θ, ``(B, 2, 3)`` when both θ
    and the linearised motion are affine, else a homography ``(B, 3, 3)`` (an affine θ is lifted when
    the reference was linearised for a homography).

    ``moving`` ``(B, D, h, w)`` is the moving image's features on the reference's
    grid. Solves ``min_p Σ w · |warp(moving, θ) - R(W_p x)|²`` linearised at ``p = 0``, then
    θ ← θ ∘ W_p⁻¹; with ``robust``, each cell's weight is a Cauchy weight of its residual. The
    gradients are the mean of the reference's and the warped moving map's (the efficient
    second-order form): with the reference's alone, the fixed point drifts wherever the two maps
    differ by more than motion, as latents of a warped photo do.

    The normal equations are two matrix products of per-cell structure tensors with Jacobian products
    computed once (:class:`LinearisedReference`), so no ``(B, D, cells, P)`` tensor is ever formed:
    this is the inner loop of the aligner. With ``shear_free``, the step is the least-squares one
    among the shear-free motions (the system projected on :func:`shear_free_basis`).
    """
    reference = linearised.features
    batch, num_params = reference.shape[0], linearised.num_params
    warped, weights = _warp_and_match(linearised, moving, theta, moving_weights)
    residual = (warped - reference).flatten(2)  # (B, D, N)
    if robust:
        with torch.no_grad():
            squared = residual.pow(2).mean(dim=1)  # (B, N)
            masked = torch.where(weights > 0, squared, torch.full_like(squared, float("nan")))
            typical = masked.nanmedian(dim=1, keepdim=True).values.nan_to_num(1.0).clamp_min(1e-8)
            weights = weights / (1.0 + squared / (ROBUST_SCALE**2 * typical))
    moving_x, moving_y = _flat_gradients(warped)
    grad_x = 0.5 * (linearised.grad_x + moving_x)  # (B, D, N)
    grad_y = 0.5 * (linearised.grad_y + moving_y)
    # Per-cell structure tensor and drive, summed over channels and weighted: (B, 3N) and (B, 2N).
    # (Separate x and y maps: a channel sum over a stacked (B, 2, D, N) map is a strided, slower reduction.)
    tensor = torch.stack([(grad_x * grad_x).sum(1), (grad_x * grad_y).sum(1), (grad_y * grad_y).sum(1)], dim=1)
    drive = torch.stack([(grad_x * residual).sum(1), (grad_y * residual).sum(1)], dim=1)
    weights = weights.unsqueeze(1)  # (B, 1, N)
    moments = (tensor * weights) @ linearised.monomials  # (B, 3, K)
    hessian = (moments.flatten(1) @ linearised.assemble).view(batch, num_params, num_params)
    gradient = (drive * weights).flatten(1) @ linearised.jacobian  # (B, P)
    if shear_free:
        basis = shear_free_basis(*reference.shape[-2:], num_params, hessian.dtype, hessian.device)  # (P, 5)
        hessian, gradient = basis.T @ hessian @ basis, gradient @ basis
    damping = torch.diag_embed(DAMPING * torch.diagonal(hessian, dim1=-2, dim2=-1) + 1e-8)
    params = torch.linalg.solve(hessian + damping, gradient.unsqueeze(-1)).squeeze(-1)  # (B, P) or (B, 5)
    if shear_free:
        params = params @ basis.T  # (B, P)
    # θ ← θ ∘ W_p⁻¹. With both affine, the (2, 3) θ times the (3, 3) inverse is already the product's top rows.
    step = torch.linalg.inv(params_to_matrix(params))  # (B, 3, 3)
    if num_params == 6 and not geometry.is_homography(theta):
        return theta @ step
    return geometry.compose_theta(theta, step)


def native_step_applies(linearised: LinearisedReference, stacked: torch.Tensor, theta: torch.Tensor) -> bool:
    """Whether the C step (``stn_diffusers._speedups``) can take this step: built, no gradient
    wanted, float32 maps on the CPU and an affine step from an affine θ."""
    return (
        _speedups is not None
        and not torch.is_grad_enabled()
        and linearised.num_params == 6
        and tuple(theta.shape[1:]) == (2, 3)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (linearised.features, stacked, theta))
    )


def _native_input(
    linearised: LinearisedReference, moving: torch.Tensor, moving_weights: torch.Tensor | None, theta: torch.Tensor
) -> torch.Tensor | None:
    """The moving map stacked with its content plane (:func:`with_content`) when the C build can take
    the problem (:func:`native_step_applies`), else ``None``: the PyTorch code serves."""
    stacked = with_content(moving, moving_weights)
    return stacked if native_step_applies(linearised, stacked, theta) else None


def _native_refine(
    linearised: LinearisedReference,
    stacked: torch.Tensor,
    theta: torch.Tensor,
    iterations: int,
    robust: bool,
    tolerance: float,
    shear_free_steps: int,
) -> torch.Tensor:
    """:func:`refine`'s loop in C, every step and the convergence test in one call (see
    ``stn_diffusers/_speedups.c``)."""
    batch, channels, height, width = linearised.features.shape
    buffers = [
        t.contiguous()
        for t in (linearised.features, linearised.grad_x, linearised.grad_y, linearised.weights, stacked, theta)
    ]
    out = torch.empty_like(buffers[-1])
    _speedups.gauss_newton_refine(
        batch, channels, height, width, *(t.data_ptr() for t in buffers), out.data_ptr(),
        iterations, shear_free_steps, tolerance, robust, DAMPING, CONTENT_LEVEL, ROBUST_SCALE,
    )  # fmt: skip
    return out


def _native_compare(
    linearised: LinearisedReference, stacked: torch.Tensor, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`compare_with_identity` in C (see ``stn_diffusers/_speedups.c``)."""
    batch, channels, height, width = linearised.features.shape
    buffers = [t.contiguous() for t in (linearised.features, linearised.weights, stacked, theta)]
    answer, identity, share = torch.empty(3, batch)
    _speedups.compare_with_identity(
        batch, channels, height, width, *(t.data_ptr() for t in buffers),
        answer.data_ptr(), identity.data_ptr(), share.data_ptr(), CONTENT_LEVEL,
    )  # fmt: skip
    return answer, identity, share


def refine(
    linearised: LinearisedReference,
    moving: torch.Tensor,
    theta: torch.Tensor,
    iterations: int,
    robust: bool = True,
    tolerance: float = 0.0,
    moving_weights: torch.Tensor | None = None,
    shear_free_steps: int = 0,
    native: bool = False,
) -> torch.Tensor:
    """Up to ``iterations`` Gauss–Newton steps from θ; returns the last iterate. The first
    ``shear_free_steps`` are held to the shear-free motions (see :func:`gauss_newton_step`).

    With ``tolerance > 0``, stops early once no entry of any pair's θ moved by more than it in a step
    (normalised units: 1e-4 is 0.026 px of a 512-px image): converged pairs then cost nothing more.
    Training keeps a fixed count (``tolerance=0``), so every run takes the same steps.

    With ``native``, the level runs in C (``stn_diffusers._speedups``) where
    :func:`native_step_applies`: the same steps and stopping rule up to float rounding, several times
    faster on small maps. Inference asks for it; training does not, so trained weights do not depend on
    whether the C build is present.
    """
    stacked = _native_input(linearised, moving, moving_weights, theta) if native else None
    if stacked is not None:
        return _native_refine(linearised, stacked, theta, iterations, robust, tolerance, shear_free_steps)
    for index in range(iterations):
        previous = theta
        theta = gauss_newton_step(linearised, moving, theta, robust, moving_weights, index < shear_free_steps)
        if tolerance > 0 and previous.shape == theta.shape:
            if float((theta - previous).detach().abs().max()) < tolerance:
                break
    return theta
