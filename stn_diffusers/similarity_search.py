"""Exhaustive search over rotations, scales and shifts: the wide basin of the search-refine design.

Pure functions, no modules. A local refinement (Gauss–Newton, a correlation window) converges only
from a start within a few degrees and a few percent of the truth; photos rotated by 30° or scaled by
25 % lie far outside. Rather than hope a network learns rotation-invariant features, the search tries
each candidate rotation and scale explicitly: it warps the moving feature map by the candidate,
correlates it with the reference at every shift within the range, and keeps the best.

Scores are correlations normalised over the cells both maps cover (:func:`shift_scores`), with a
mild preference for a larger overlap, so a candidate that keeps little overlap cannot win on a few
lucky cells.

θ follows the convention in :mod:`stn_diffusers.geometry`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import geometry

# How much a larger overlap is preferred in the search score (see :func:`shift_scores`).
OVERLAP_EXPONENT = 1.0


def similarity_candidates(rotations: torch.Tensor, scales: torch.Tensor, aspect: float = 1.0) -> torch.Tensor:
    """θ ``(R·S, 2, 3)`` of every rotation (degrees, ``(R,)``) and scale (``(S,)``) about the centre.

    Rotations are true rotations in pixels for ``aspect = W / H``; ordered rotation-major.
    """
    angle = torch.deg2rad(rotations.double())[:, None]  # (R, 1)
    scale = scales.double()[None, :]  # (1, S)
    cos, sin = (angle.cos() * scale).flatten(), (angle.sin() * scale).flatten()  # (R·S,)
    zeros = torch.zeros_like(cos)
    # In normalised units x_n = x_p·2/W, y_n = y_p·2/H: L_n = diag(1/aspect, 1) · L_p · diag(aspect, 1).
    theta = torch.stack([torch.stack([cos, -sin / aspect, zeros], -1), torch.stack([sin * aspect, cos, zeros], -1)], -2)
    return theta.float()


def standardise(features: torch.Tensor, weights: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Zero mean and unit variance per map and channel: ``(B, D, h, w)`` → ``(B, D, h, w)``.

    With ``weights`` ``(B, 1, h, w)``, the statistics are those of the weighted cells.
    """
    if weights is None:
        mean = features.mean(dim=(2, 3), keepdim=True)
        var = features.var(dim=(2, 3), keepdim=True, unbiased=False)
    else:
        total = weights.sum(dim=(2, 3), keepdim=True).clamp_min(eps)
        mean = (features * weights).sum(dim=(2, 3), keepdim=True) / total
        var = (((features - mean) ** 2) * weights).sum(dim=(2, 3), keepdim=True) / total
    return (features - mean) / (var + eps).sqrt()


def shift_scores(
    reference: torch.Tensor,
    moving: torch.Tensor,
    coverage: torch.Tensor,
    radius: int,
    reference_weights: torch.Tensor | None = None,
    coverage_spectrum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalised correlation of each reference with its moving maps at every integer shift within ``radius``.

    ``reference`` ``(B, D, h, w)``; ``moving`` ``(B, K, D, h, w)``, ``K`` maps per reference, zero
    where they have no content, and their ``coverage`` ``(B, K, 1, h, w)`` in ``[0, 1]``;
    ``reference_weights`` ``(B, 1, h, w)`` (default: ones). Returns ``(B, K, 2r+1, 2r+1)``, entry
    ``[..., i, j]`` for the moving map shifted by ``(i - r, j - r)`` cells (rows, columns):

        ``Σ ⟨r, m⟩ / √(Σ |r|² · Σ |m|²) · (overlap / (h·w)) ** OVERLAP_EXPONENT``

    with every sum over the cells both maps cover at that shift. Normalising over the overlap keeps a
    rotated candidate, whose corners fall outside, level with the unrotated one; the overlap factor
    keeps a candidate that matches a sliver from winning.

    All four sums are correlations, computed together by FFT over maps zero-padded by at least
    ``radius`` (so no shift wraps around, :func:`fft_size`): one forward transform per side, one
    inverse for all four. ``coverage_spectrum`` ``(K, 1, n, m // 2 + 1)``: the coverage's transform
    when the caller has it (it depends on the candidates alone when every moving cell is content).
    """
    batch, channels, height, width = reference.shape
    weights = reference.new_ones(batch, 1, height, width) if reference_weights is None else reference_weights
    reference = reference * weights
    size = fft_size(height, width, radius)
    reference_side = _padded_spectrum(torch.cat([reference, weights, reference.pow(2).sum(1, keepdim=True)], 1), size)
    energy = moving.pow(2).sum(2, keepdim=True)
    if coverage_spectrum is None:
        moving_side = _padded_spectrum(torch.cat([moving, coverage, energy], 2), size)
        coverage_side, energy_side = moving_side[:, :, channels], moving_side[:, :, channels + 1]
    else:
        moving_side = _padded_spectrum(torch.cat([moving, energy], 2), size)
        coverage_side, energy_side = coverage_spectrum[:, 0], moving_side[:, :, channels]
    reference_side = reference_side.conj().unsqueeze(1)  # (B, 1, D + 2, ·, ·)
    spectra = torch.stack(
        [
            (moving_side[:, :, :channels] * reference_side[:, :, :channels]).sum(2),  # Σ ⟨r, m⟩
            (coverage_side * reference_side[:, :, channels + 1]).expand_as(energy_side),  # Σ |r|² over coverage
            energy_side * reference_side[:, :, channels],  # Σ |m|² over weights
            (coverage_side * reference_side[:, :, channels]).expand_as(energy_side),  # overlap
        ],
        dim=2,
    )  # (B, K, 4, ·, ·)
    product, reference_energy, moving_energy, overlap = _shift_window(spectra, size, radius).unbind(2)
    normalised = product / (reference_energy * moving_energy).clamp_min(1e-12).sqrt()
    return normalised * (overlap.clamp_min(0) / (height * width)) ** OVERLAP_EXPONENT


def fft_size(height: int, width: int, radius: int) -> tuple[int, int]:
    """The even FFT size ``(n, m)`` at which an ``h × w`` correlation reaches every shift within
    ``radius`` without wrapping around."""
    return height + radius + (height + radius) % 2, width + radius + (width + radius) % 2


def _padded_spectrum(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``torch.fft.rfft2(maps, s=size)`` for real ``(..., h, w)`` maps zero-padded to ``size``: each of
    the ``h`` rows is transformed, then the columns, so the padded rows cost no transform."""
    return torch.fft.fft(torch.fft.rfft(maps, n=size[1], dim=-1), n=size[0], dim=-2)


def _shift_window(spectra: torch.Tensor, size: tuple[int, int], radius: int) -> torch.Tensor:
    """Spectra ``(..., n, m // 2 + 1)`` of circular correlations of period ``size = (n, m)`` →
    ``(..., 2r+1, 2r+1)``, entry ``[i, j]`` for the shift ``(i - r, j - r)``.

    ``irfft2`` in two passes: the columns' inverse, then only the window's rows inverted along the
    last axis; each axis wraps its last ``r`` entries before its first ``r + 1`` (two slices joined,
    which copy only the window: an index gather costs several times more here).
    """
    wrap = lambda maps, dim: torch.cat(  # noqa: E731
        [maps.narrow(dim, maps.shape[dim] - radius, radius), maps.narrow(dim, 0, radius + 1)], dim=dim
    )
    rows = wrap(torch.fft.ifft(spectra, dim=-2), -2)
    return wrap(torch.fft.irfft(rows, n=size[1], dim=-1), -1)


@functools.lru_cache(maxsize=32)
def _candidate_grid(
    rotations: tuple[float, ...],
    scales: tuple[float, ...],
    aspect: float,
    size: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate's θ ``(K, 2, 3)`` (:func:`similarity_candidates`) and the positions it samples on
    an ``h × w`` grid ``(K, h, w, 2)``: the same for every pair, so one search after another reuses
    them. Never modified in place."""
    with torch.inference_mode(False), torch.no_grad():  # reusable by a later training step (see gauss_newton)
        candidates = similarity_candidates(torch.tensor(rotations), torch.tensor(scales), aspect).to(device, dtype)
        # F.affine_grid, as geometry.warp samples: the same positions to the last bit, so training
        # (which searches too) keeps the arithmetic that trained the shipped weights.
        return candidates, F.affine_grid(candidates, [len(candidates), 1, *size], align_corners=False)


def _warp_down(maps: torch.Tensor, grid: torch.Tensor, factor: int) -> torch.Tensor:
    """``maps`` ``(N, C, h·f, w·f)`` sampled at ``grid`` and averaged down by ``factor``, ``(N, C, h, w)``."""
    warped = F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(warped, factor, ceil_mode=True) if factor > 1 else warped


@functools.lru_cache(maxsize=32)
def _candidate_coverage(
    rotations: tuple[float, ...],
    scales: tuple[float, ...],
    aspect: float,
    size: tuple[int, int],
    factor: int,
    spectrum_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's coverage of a map whose every cell is content, ``(1, K, 1, h, w)`` (``size``
    is the map's ``h·f × w·f``, averaged down by ``factor``), and its transform ``(K, 1, n, m // 2 + 1)``
    at ``spectrum_size``; float32 on the CPU. Never modified in place."""
    with torch.inference_mode(False), torch.no_grad():  # reusable by a later training step (see gauss_newton)
        _, grid = _candidate_grid(rotations, scales, aspect, size, torch.float32, torch.device("cpu"))
        coverage = _warp_down(torch.ones(grid.shape[0], 1, *size), grid, factor)  # (K, 1, h, w)
        return coverage[None], _padded_spectrum(coverage, spectrum_size)


def search_similarity(
    reference: torch.Tensor,
    moving: torch.Tensor,
    rotations: torch.Tensor,
    scales: torch.Tensor,
    radius: int,
    reference_weights: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    top_k: int = 1,
    moving_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best θ ``(B, 2, 3)`` over every candidate rotation, scale and integer shift, and its score ``(B,)``;
    with ``top_k > 1``, the best shifts of the ``top_k`` best candidates, ``(B, k, 2, 3)`` and ``(B, k)``.

    Args:
        reference: ``(B, D, h, w)`` features of the reference (standardised by the caller).
        moving: ``(B, D, h·f, w·f)`` features of the moving image on the same grid or one ``f`` times
            finer (warped there, then averaged down by ``f``).
        rotations: ``(R,)`` candidate rotations in degrees.
        scales: ``(S,)`` candidate scales.
        radius: shifts of up to ``radius`` cells per axis are tried.
        reference_weights: ``(B, 1, h, w)`` in ``[0, 1]``: cells of weight 0 take no part in the score.
        start: ``(B, 2, 3)``: candidates are ``start ∘ candidate`` (a finer search around an earlier
            answer); default: the identity.
        moving_weights: ``(B, 1, h·f, w·f)`` in ``[0, 1]``: the moving map's content (0 over the zero
            padding of an earlier warp), which then counts as uncovered, like the cells a candidate
            brings in from outside the map; default: ones.

    The search is not differentiable (it picks an argmax); what follows it refines and trains.
    """
    batch, channels, height, width = reference.shape
    factor = moving.shape[-1] // width
    moving_size = tuple(moving.shape[-2:])
    key = (tuple(rotations.tolist()), tuple(scales.tolist()), width / height, moving_size)
    candidates, grid = _candidate_grid(*key, reference.dtype, reference.device)  # (K, 2, 3), (K, h·f, w·f, 2)
    num_candidates = candidates.shape[0]
    thetas = candidates.repeat(batch, 1, 1)  # (B·K, 2, 3)
    if start is not None:
        thetas = geometry.compose_theta(start.to(reference).repeat_interleave(num_candidates, dim=0), thetas)
        grid = F.affine_grid(thetas, [len(thetas), 1, *moving_size], align_corners=False)
    elif batch > 1:
        grid = grid.repeat(batch, 1, 1, 1)
    # Warped at the moving map's own resolution, then averaged down to the reference's grid: every
    # candidate is then as smooth as the reference, which an upsampled (zoomed-in) candidate would
    # otherwise not be, and smoother maps correlate better.
    warp = lambda maps: _warp_down(maps, grid, factor).view(batch, num_candidates, -1, height, width)  # noqa: E731
    if moving_weights is None and start is None:
        # Every moving cell is content: each candidate's coverage, and its spectrum, are the same for
        # every pair, kept once per grid.
        coverage, coverage_spectrum = _candidate_coverage(*key, factor, fft_size(height, width, radius))
        warped = warp(moving.repeat_interleave(num_candidates, dim=0))
        coverage = coverage.to(reference).expand(batch, -1, -1, -1, -1)
        spectrum = coverage_spectrum.to(warped.device)
        scores = shift_scores(reference, warped, coverage, radius, reference_weights, spectrum)
    else:
        # The map and its content plane warped together: the plane says where the candidate has content.
        content = torch.ones_like(moving[:, :1]) if moving_weights is None else moving_weights.to(moving.dtype)
        warped = warp(torch.cat([moving * content, content], dim=1).repeat_interleave(num_candidates, dim=0))
        scores = shift_scores(reference, warped[:, :, :channels], warped[:, :, channels:], radius, reference_weights)
    # The best shift of each candidate, then the best candidates: distinct rotations or scales.
    per_candidate, shifts = scores.flatten(2).max(dim=2)  # (B, K)
    best_score, candidate = per_candidate.topk(min(top_k, num_candidates), dim=1)  # (B, k)
    shift = shifts.gather(1, candidate)  # (B, k)
    window = 2 * radius + 1
    # A shift of s cells on the warped grid samples the moving map at θ_c·(p + s): translation L_c·s.
    shift_cells = torch.stack([shift % window - radius, shift // window - radius], -1).to(reference)  # (B, k, 2)
    shift_normalised = shift_cells * shift_cells.new_tensor([2.0 / width, 2.0 / height])
    theta = thetas.view(batch, num_candidates, 2, 3).gather(1, candidate[..., None, None].expand(-1, -1, 2, 3))
    translation = theta[..., 2] + (theta[..., :2] @ shift_normalised.unsqueeze(-1)).squeeze(-1)
    theta = torch.cat([theta[..., :2], translation.unsqueeze(-1)], dim=-1)  # (B, k, 2, 3)
    if top_k == 1:
        return theta[:, 0], best_score[:, 0]
    return theta, best_score


def default_rotations(max_degrees: float, step_degrees: float) -> torch.Tensor:
    """Rotations ``(R,)`` from ``-max_degrees`` to ``max_degrees`` in steps of at most ``step_degrees``."""
    count = 2 * math.ceil(max_degrees / step_degrees) + 1
    return torch.linspace(-max_degrees, max_degrees, count)


def default_scales(max_scale: float, step_ratio: float) -> torch.Tensor:
    """Scales ``(S,)`` from ``1 / max_scale`` to ``max_scale``, geometrically spaced, neighbours at most
    ``step_ratio`` apart; an odd count, so 1 is always one of them (aligned pairs need no scale step)."""
    steps = max(0, math.ceil(math.log(max_scale) / math.log(step_ratio)))
    return max_scale ** torch.linspace(-1.0, 1.0, 2 * steps + 1)
