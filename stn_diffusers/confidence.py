"""How sure an alignment is: pixel evidence that ``warp(moving, θ)`` matches ``reference``, and a
calibrated confidence in ``[0, 1]`` that its corner error is small.

An aligner always returns a θ, right or wrong; this module looks at the pixels to say which. It
works on gray images at a small working size (:data:`EVIDENCE_SIZE` on the longer side), so it
costs a few milliseconds per pair at any image size, and needs nothing but torch.

Evidence (:func:`alignment_evidence`):
    The moving image, warped by θ into the reference frame, is compared with the reference on their
    image gradients (edges), which a change of brightness, contrast or gamma leaves in place. The
    overlap is cut into a :data:`BLOCK_GRID` × :data:`BLOCK_GRID` grid of blocks. In each block the
    normalised correlation of the two gradient fields is measured at θ and at every whole-pixel
    shift up to :data:`SEARCH_RADIUS`; the best shift, refined to a fraction of a pixel by a parabola
    through its neighbours, is what is left of the motion in that block. An affine map fitted to the
    blocks' residual shifts (weighted by how well each block matches, and robustly, so that a few
    blocks that disagree lose their say) gives ``residual``, the mean corner error θ still leaves. A
    right θ leaves every block at its correlation peak (residual near 0); a θ a few pixels off leaves
    them all shifted the same way; an unrelated pair or a θ far off leaves weak, scattered peaks.
    ``correlation`` is the median over blocks of the correlation at θ (robust to an edited region
    covering a few blocks), ``overlap`` the share of the reference the warped moving image covers.
    An ``ignore_mask`` (white = ignore, in the reference frame, as the pipeline's) takes an edited
    region out of every sum.

    Measured on the calibration pairs (``benchmarks/confidence.py``), ``residual`` separates right
    from wrong θ on its own almost everywhere; ``correlation`` adds what it misses on unrelated
    pairs. The global correlation of intensities or of gradients, the overlap, and the correlation
    the identity would reach (a θ no better than doing nothing) separate far less, and are not used.

Confidence (:func:`alignment_confidence`):
    A logistic function of ``residual`` (in units of :data:`ERROR_FRACTION`) and ``correlation``,
    fitted by ``benchmarks/confidence.py`` on seeded pairs of held-out photos (good, failed and
    unrelated pairs, with photometric and local changes): the probability that θ's mean corner error
    is below :data:`ERROR_FRACTION` of the reference's longer side (5 px at 512 px, the calibration
    size). Below :data:`DEFAULT_CONFIDENCE_THRESHOLD`, treat the alignment as failed.

Scale:
    The evidence lives at the working size, so an error is judged relative to the image: the
    confidence speaks of errors above 1 % of the longer side whatever the resolution (5 px at 512 px,
    20 px at 2048 px), not of a fixed number of pixels.

Convention:
    θ as in :mod:`stn_diffusers.geometry`, ``(B, 2, 3)`` or ``(B, 3, 3)``: ``warp(moving, θ)``
    lies on the reference. The moving image may have any size; it is resized to the reference's
    working size first (θ is normalised, so it does not change).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import geometry
from .images import MASK_THRESHOLD, ImageInput, format_size, pick, to_mask_list, to_rgb_list

# Longer side, in pixels, of the gray images the evidence is computed on: a 1 % error is 1.3 px there,
# which the sub-pixel block search resolves, and a pair costs a few milliseconds.
EVIDENCE_SIZE = 128
# Blocks per side: 16 blocks, so an edited region covering a few of them cannot move the median
# correlation or outvote the others in the residual fit.
BLOCK_GRID = 4
# Largest shift searched in each block, in working pixels (about 2 % of the side each way).
SEARCH_RADIUS = 2
# Weight of a block whose gradients do not correlate at any shift (flat sky, an edited region, an
# unrelated image): small, but not zero, so a pair with no matching block still gets a residual.
MIN_BLOCK_WEIGHT = 0.02
# Share of a block the warped moving image must cover (outside any ignored region) for the block to count.
MIN_BLOCK_COVERAGE = 0.5
# Fewest counted blocks that determine the residual affine map (6 unknowns, 2 per block).
MIN_BLOCKS = 3
# The residual fit is reweighted this many times: blocks whose shift disagrees with the fitted map by
# more than about ROBUST_SCALE working pixels (2 px at 512) lose weight (Cauchy weights), so an edited
# region's blocks do not pull the residual of a right θ up.
ROBUST_STEPS = 2
ROBUST_SCALE = 0.5
# The residual where θ leaves fewer than MIN_BLOCKS blocks covered: the whole side, no evidence of a match.
NO_EVIDENCE_RESIDUAL = 1.0
# Gradient energy below which a block is flat: its correlation is 0 (no evidence either way).
MIN_GRADIENT_ENERGY = 1e-12
# BT.601 luma, as OpenCV's and the project's other gray conversions (refine.to_gray).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# The error the confidence is calibrated to predict: a mean corner error above this fraction of the
# reference's longer side (5 px at 512 × 512, the calibration pairs' size) is a failed alignment.
CALIBRATION_SIZE = 512
ERROR_FRACTION = 5.0 / CALIBRATION_SIZE
# Logistic model: confidence = sigmoid(INTERCEPT + RESIDUAL_WEIGHT · residual / ERROR_FRACTION
# + CORRELATION_WEIGHT · correlation), fitted on the even half of data/photos/heldout by
#     taskset -c 0 python benchmarks/confidence.py --fit-only
# and written here by hand; the same script without --fit-only reports the rates on the other half.
CONFIDENCE_INTERCEPT = 3.37
RESIDUAL_WEIGHT = -6.01
CORRELATION_WEIGHT = 1.91
# Below this confidence an alignment counts as failed: more likely wrong than right. On the fitting
# half it flags 99.9 % of errors above 5 px and 100 % of unrelated pairs, with false alarms on 1.6 % of
# errors below 2 px; any threshold from 0.3 to 0.8 does about as well there.
DEFAULT_CONFIDENCE_THRESHOLD = 0.5


@dataclass
class AlignmentEvidence:
    """What the pixels say about θ (:func:`alignment_evidence`); every field ``(B,)`` float32.

    Args:
        correlation: median over the blocks the overlap covers of the normalised correlation of the
            reference's and the warped moving image's gradients at θ (1 = edges match exactly up to
            contrast, 0 = unrelated or flat; 0 where fewer than :data:`MIN_BLOCKS` blocks are covered).
        residual: the mean corner error θ still leaves, estimated by block matching, as a fraction of
            the reference's longer side (0.01 = 5 px at 512 px); :data:`NO_EVIDENCE_RESIDUAL` where
            fewer than :data:`MIN_BLOCKS` blocks are covered. Only shifts up to :data:`SEARCH_RADIUS`
            working pixels are searched, so larger errors read as about that much or as scattered,
            weak peaks.
        overlap: share of the reference covered by the warped moving image.
    """

    correlation: torch.Tensor
    residual: torch.Tensor
    overlap: torch.Tensor


def alignment_evidence(
    reference: ImageInput | list[ImageInput],
    moving: ImageInput | list[ImageInput],
    theta: torch.Tensor,
    ignore_mask: ImageInput | list[ImageInput] | None = None,
) -> AlignmentEvidence:
    """Measure how well ``warp(moving, theta)`` matches ``reference`` on their pixels (see the module docs).

    Args:
        reference: the reference image(s): a ``(B, 3, H, W)`` tensor in ``[0, 1]``, a list of ``(3, H, W)``
            tensors, or any image input of :mod:`stn_diffusers.images`; one reference is shared by every
            moving image.
        moving: the moving image(s), ``B`` of them, any size each.
        theta (`torch.Tensor` of shape `(B, 2, 3)` or `(B, 3, 3)`): aligns each moving image onto its
            reference (see :mod:`stn_diffusers.geometry`). A non-finite θ gets no evidence (correlation
            0, residual :data:`NO_EVIDENCE_RESIDUAL`, overlap 0).
        ignore_mask: the reference pixels not to judge by (white = ignore: an edited region), one mask
            shared by every pair or one per pair, each at its reference's size; PIL, numpy or torch by
            the mask rules of :func:`stn_diffusers.images.to_mask_tensor` (the pipeline's ignore masks).

    Returns:
        :class:`AlignmentEvidence`, each field ``(B,)``.

    Raises:
        TypeError: ``theta`` is not a tensor.
        ValueError: ``theta`` is not ``(B, 2, 3)`` or ``(B, 3, 3)`` with ``B`` the number of moving
            images, the references or the ignore masks are neither one nor ``B``, or a mask is not at
            its reference's size or ignores every pixel.
    """
    references, movings, theta = _check_inputs(reference, moving, theta)
    masks = _check_ignore_masks(ignore_mask, references, len(movings)) if ignore_mask is not None else [None]
    fields = [
        _pair_evidence(pick(references, i), movings[i], theta[i : i + 1], pick(masks, i)) for i in range(len(movings))
    ]
    correlation, residual, overlap = (torch.tensor(values, dtype=torch.float32) for values in zip(*fields))
    return AlignmentEvidence(correlation=correlation, residual=residual, overlap=overlap)


def confidence_from_evidence(evidence: AlignmentEvidence) -> torch.Tensor:
    """``(B,)`` confidence in ``[0, 1]`` from :class:`AlignmentEvidence`: the fitted logistic model
    (:data:`CONFIDENCE_INTERCEPT`, :data:`RESIDUAL_WEIGHT`, :data:`CORRELATION_WEIGHT`)."""
    logit = (
        CONFIDENCE_INTERCEPT
        + RESIDUAL_WEIGHT * evidence.residual / ERROR_FRACTION
        + CORRELATION_WEIGHT * evidence.correlation
    )
    return torch.sigmoid(logit)


def alignment_confidence(
    reference: ImageInput | list[ImageInput],
    moving: ImageInput | list[ImageInput],
    theta: torch.Tensor,
    ignore_mask: ImageInput | list[ImageInput] | None = None,
) -> torch.Tensor:
    """``(B,)`` float32 in ``[0, 1]``: how likely ``theta`` aligns ``moving`` onto ``reference`` with a
    mean corner error below :data:`ERROR_FRACTION` of the reference's longer side (5 px at 512 px).

    Arguments and errors as :func:`alignment_evidence`. Compare with :data:`DEFAULT_CONFIDENCE_THRESHOLD`:
    below it, treat the alignment as failed (a wrong θ, or images that do not show the same scene).
    """
    return confidence_from_evidence(alignment_evidence(reference, moving, theta, ignore_mask))


# ------------------------------------------------------------------------------------ internals
def _check_inputs(reference, moving, theta) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Images as lists of ``(3, H, W)`` in ``[0, 1]`` and θ checked against them, float64 on the CPU."""
    if not isinstance(theta, torch.Tensor):
        raise TypeError(
            f"expected theta to be a torch.Tensor of shape (B, 2, 3) or (B, 3, 3), got {type(theta).__name__}"
        )
    movings = to_rgb_list(moving, "moving")
    references = to_rgb_list(reference, "reference")
    batch = len(movings)
    if theta.ndim != 3 or tuple(theta.shape[1:]) not in ((2, 3), (3, 3)) or theta.shape[0] != batch:
        raise ValueError(
            f"expected theta of shape ({batch}, 2, 3) or ({batch}, 3, 3) (one per moving image), "
            f"got {tuple(theta.shape)}"
        )
    if len(references) not in (1, batch):
        raise ValueError(f"expected 1 reference (shared) or {batch} (one per moving image), got {len(references)}")
    return references, movings, theta.detach().to("cpu", torch.float64)


def _check_ignore_masks(ignore_mask, references: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Ignore masks as binary ``(1, H, W)`` (1 = ignore), one shared or one per pair, each checked
    against its reference's size and for leaving some pixels."""
    masks = to_mask_list(ignore_mask, "ignore_mask")
    if len(masks) not in (1, batch):
        raise ValueError(f"expected 1 ignore_mask (shared) or {batch} (one per moving image), got {len(masks)}")
    for i in range(max(len(masks), len(references))):
        name = f"ignore_mask[{i}]" if len(masks) > 1 else "ignore_mask"
        mask, size = pick(masks, i), tuple(pick(references, i).shape[-2:])
        if tuple(mask.shape[-2:]) != size:
            raise ValueError(
                f"expected {name} of size {format_size(size)} (its reference's), got {format_size(mask.shape[-2:])}"
            )
        if bool(mask.min() >= 1):
            raise ValueError(
                f"expected {name} to leave some pixels to judge by (black = use), got a mask that ignores every pixel"
            )
    return masks


def _gray(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` → gray ``(1, 1, h, w)`` float64 at ``size``, antialiased (float64 only once small)."""
    gray = (image * image.new_tensor(LUMA_WEIGHTS).view(3, 1, 1)).sum(0)[None, None]
    return F.interpolate(gray, size=size, mode="bilinear", antialias=True, align_corners=False).double()


def _working_size(height: int, width: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side :data:`EVIDENCE_SIZE` and the aspect kept."""
    scale = EVIDENCE_SIZE / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _gradients(gray: torch.Tensor) -> torch.Tensor:
    """Sobel gradients ``(1, 2, h, w)`` (x, y) of ``(1, 1, h, w)``; edges replicated, so the image
    border itself is no edge."""
    sobel_x = gray.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # (2, 1, 3, 3)
    return F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """``(1, 1, h, w)`` binary mask shrunk by one pixel: drops the pixels whose Sobel window reads padding."""
    return -F.max_pool2d(-mask, 3, stride=1, padding=1)


def _row_of_shifts(image: torch.Tensor, dy: int) -> torch.Tensor:
    """The shifts ``(dy, dx)`` of ``(1, C, h, w)`` for every ``dx`` up to :data:`SEARCH_RADIUS`,
    ``(span, C, h, w)``: entry ``dx`` is ``output(y, x) = image(y - dy, x - dx)``, zero where that falls
    outside. A row at a time keeps each block statistic one batched pass over a tensor small enough
    to stay in cache (all ``span²`` shifts at once are slower on the CPU than one at a time)."""
    radius = SEARCH_RADIUS
    height, width = image.shape[-2:]
    padded = F.pad(image, (radius, radius, radius, radius))
    rows = padded[..., radius - dy : radius - dy + height, :]
    return torch.cat([rows[..., radius - dx : radius - dx + width] for dx in range(-radius, radius + 1)])


def _block_means(image: torch.Tensor) -> torch.Tensor:
    """``(N, C, h, w)`` → ``(N, BLOCK_GRID, BLOCK_GRID)``: the mean over each block of the channel sum."""
    return F.adaptive_avg_pool2d(image.sum(1, keepdim=True), BLOCK_GRID)[:, 0]


def _parabola_peak(before: torch.Tensor, peak: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Sub-pixel offset in ``[-0.5, 0.5]`` of the vertex of the parabola through three samples at -1, 0, 1
    around a maximum; 0 where they do not bend down (a flat or edge peak)."""
    curvature = before - 2 * peak + after
    bends = curvature < 0
    offset = 0.5 * (before - after) / torch.where(bends, curvature, torch.ones_like(curvature))
    return torch.where(bends, offset.clamp(-0.5, 0.5), torch.zeros_like(offset))


def _pair_evidence(
    reference: torch.Tensor, moving: torch.Tensor, theta: torch.Tensor, ignore: torch.Tensor | None
) -> tuple[float, float, float]:
    """``(correlation, residual, overlap)`` of one pair: ``(3, H, W)`` images, θ ``(1, 2|3, 3)`` float64
    and an ignore mask ``(1, H, W)`` (1 = ignore) or ``None``."""
    if not torch.isfinite(theta).all():
        return 0.0, NO_EVIDENCE_RESIDUAL, 0.0
    height, width = _working_size(*reference.shape[-2:])
    warped = geometry.warp(_gray(moving, (height, width)), theta)  # the moving image resized, then aligned
    covered = geometry.valid_mask(theta, height, width)  # (1, 1, h, w)
    overlap = float(covered.mean())
    valid = _erode(covered)  # warped pixels with no padding under the Sobel window
    kept = torch.ones_like(valid) if ignore is None else _kept_pixels(ignore, (height, width))
    reference_gradients = _gradients(_gray(reference, (height, width))) * kept  # (1, 2, h, w)
    scores = _block_scores(reference_gradients, _gradients(warped) * valid, valid, kept)  # (span, span, g, g)
    counted = _block_means(valid * kept)[0] >= MIN_BLOCK_COVERAGE  # (g, g)
    if int(counted.sum()) < MIN_BLOCKS:
        return 0.0, NO_EVIDENCE_RESIDUAL, overlap
    correlation = float(scores[SEARCH_RADIUS, SEARCH_RADIUS][counted].median())
    return correlation, _residual(scores, counted, height, width), overlap


def _kept_pixels(ignore: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The reference pixels judged by at the working ``size``, ``(1, 1, h, w)`` (1 = judge), from an
    ignore mask ``(1, H, W)`` (1 = ignore)."""
    ignored = F.interpolate(ignore[None].double(), size=size, mode="area") >= MASK_THRESHOLD
    # Grown by the search radius and the Sobel window: an edited region's own edges (where pasted
    # content meets the photo) stay ignored at every shift, or they would pull the blocks beside it.
    margin = SEARCH_RADIUS + 1
    return 1 - F.max_pool2d(ignored.double(), 2 * margin + 1, stride=1, padding=margin)


def _block_scores(
    reference_gradients: torch.Tensor, warped_gradients: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """Normalised correlation of the two gradient fields ``(1, 2, h, w)`` in each block, over the pixels
    both sides count (``valid`` warped pixels, ``kept`` reference pixels, ``(1, 1, h, w)``), at every
    whole-pixel shift of the warped side up to :data:`SEARCH_RADIUS`: ``(span, span, g, g)`` indexed
    ``(dy, dx, block row, block column)``, ``span = 2 · SEARCH_RADIUS + 1``."""
    reference_energy = (reference_gradients**2).sum(1, keepdim=True)  # (1, 1, h, w)
    scores = []
    for dy in range(-SEARCH_RADIUS, SEARCH_RADIUS + 1):
        shifted = _row_of_shifts(warped_gradients, dy)  # (span, 2, h, w), one per dx
        cross = _block_means(reference_gradients * shifted)  # (span, g, g)
        energy = _block_means(reference_energy * _row_of_shifts(valid, dy)) * _block_means(shifted**2 * kept)
        scores.append(torch.where(energy > MIN_GRADIENT_ENERGY, cross / energy.clamp_min(1e-300).sqrt(), 0.0))
    return torch.stack(scores)  # (span, span, g, g)


def _residual(scores: torch.Tensor, counted: torch.Tensor, height: int, width: int) -> float:
    """The mean corner error, as a fraction of the longer side, of the affine map through the counted
    blocks' best shifts (``scores`` of :func:`_block_scores`, ``counted`` ``(g, g)`` bool, at the working
    size ``height × width``), each refined to a fraction of a pixel along each axis, each block weighted
    by how well it matches at its best shift, and robustly."""
    span = scores.shape[0]
    best, index = scores.flatten(0, 1).max(0)  # (g, g)
    row, column = index // span, index % span
    rows, columns = torch.meshgrid(torch.arange(BLOCK_GRID), torch.arange(BLOCK_GRID), indexing="ij")

    def score_at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return scores[r.clamp(0, span - 1), c.clamp(0, span - 1), rows, columns]

    inner_row = (row > 0) & (row < span - 1)
    inner_column = (column > 0) & (column < span - 1)
    shift_y = (
        row
        - SEARCH_RADIUS
        + torch.where(inner_row, _parabola_peak(score_at(row - 1, column), best, score_at(row + 1, column)), 0.0)
    )
    shift_x = (
        column
        - SEARCH_RADIUS
        + torch.where(inner_column, _parabola_peak(score_at(row, column - 1), best, score_at(row, column + 1)), 0.0)
    )

    centres_y = (rows.double() + 0.5) / BLOCK_GRID * 2 - 1  # normalised block centres
    centres_x = (columns.double() + 0.5) / BLOCK_GRID * 2 - 1
    centres = torch.stack([centres_x, centres_y], -1)[counted][None]  # (1, N, 2)
    shifts = torch.stack([shift_x * 2 / width, shift_y * 2 / height], -1)[counted][None]  # (1, N, 2) normalised
    weights = (best.clamp_min(0) ** 2 + MIN_BLOCK_WEIGHT)[counted][None]  # (1, N)
    motion = geometry.fit_affine(centres, centres + shifts, weights)  # (1, 2, 3)
    to_pixels = centres.new_tensor([width / 2, height / 2])
    for _ in range(ROBUST_STEPS):
        misfit = (geometry.apply_theta(motion, centres) - centres - shifts) * to_pixels  # (1, N, 2) working px
        robust = weights / (1 + (misfit**2).sum(-1) / ROBUST_SCALE**2)  # Cauchy weights
        motion = geometry.fit_affine(centres, centres + shifts, robust)
    identity = geometry.identity_theta(1, dtype=motion.dtype)
    return float(geometry.corner_error(motion, identity, height, width)[0]) / max(height, width)
