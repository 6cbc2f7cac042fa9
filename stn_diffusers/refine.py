"""Classical refinement of θ: OpenCV's ECC (``cv2.findTransformECC``) started from an estimate.

A learned aligner is robust but coarse; ECC is precise but converges only from close enough
(about 10–40 px at 512×512). Started from the STN's θ, ECC turns a coarse, robust estimate into a
precise one. OpenCV is an optional extra (``pip install "stn-diffusers[opencv]"``), imported lazily.

Convention:
    θ as in :mod:`stn_diffusers.geometry`. Its pixel matrix ``P`` (pixel centres at integers) maps a
    reference pixel ``x`` to the moving-image position ``P x`` it shows, which is exactly the warp
    ``W`` that ``cv2.findTransformECC(template=R, input=M, W)`` estimates: ``R(x) ≈ M(W x)``, with
    ``R`` the reference and ``M`` the moving image. Swapping the two images would estimate ``W⁻¹``.
    ``motion="affine"`` (``cv2.MOTION_AFFINE``) works on the 2×3 ``P[:2]`` and returns θ ``(B, 2, 3)``;
    ``motion="homography"`` (``cv2.MOTION_HOMOGRAPHY``) on the 3×3 ``P``, with the projective
    division ``W x = π(P [x, 1])``, and returns θ ``(B, 3, 3)``.
    θ is normalised, so the pyramid only changes the pixel matrix: each level converts θ with its
    own size. Between a level and the next coarser one (``s`` = 1/2) that is ``P' = S P S⁻¹`` with
    ``S = [[s, 0, (s-1)/2], [0, s, (s-1)/2], [0, 0, 1]]``: ``diag(s, s, 1)`` plus the half-pixel shift
    of pixel centres (and the exact per-axis ratio for odd sizes). The moving image may have any
    size (it is resized to the reference's size; the normalised θ does not change).

Masks:
    ``reference_mask`` marks the reference pixels ECC may use (1 = use; 0 over an edited region).
    OpenCV's ``findTransformECC`` takes its ``inputMask`` on the *input* image (the moving one: it
    checks the mask's size against it and warps it into the template frame at every iteration), so
    each pyramid level pulls the reference mask, resized to the level (nearest neighbour), into the
    moving frame with the θ that level starts from, ``mask_M(q) = mask_R(P⁻¹ q)``; ECC's own warp then
    brings it back over the reference. The correction ECC makes within one level shifts it, and the
    Gaussian pre-filter spreads the ignored content around it, so the kept region is eroded by
    ``mask_margin`` pixels first (:data:`ECC_MASK_MARGIN`). :func:`correlation`, which decides whether
    a refinement is kept, scores the kept reference pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry

OPENCV_INSTALL_HINT = 'pip install "stn-diffusers[opencv]"'
REFINE_METHODS = ("ecc",)
# ECC's motion models, named after the θ shape each returns (geometry.MATRIX_TRANSFORMS):
# "affine" (6 dof, (B, 2, 3)) and "homography" (8 dof, (B, 3, 3)).
ECC_MOTIONS = ("affine", "homography")


def motion_of(theta: torch.Tensor) -> str:
    """The ECC motion that refines ``theta`` in its own model: ``"homography"`` for ``(B, 3, 3)``,
    else ``"affine"``."""
    return "homography" if geometry.is_homography(theta) else "affine"


# ECC's Gaussian pre-filter (pixels) on the coarse levels: widens the basin of convergence. The
# finest level runs unfiltered: blurring both images biases a scaled or sheared fit by 0.1–0.2 px.
ECC_GAUSSIAN_SIZE = 5
# A refinement that moves the corners further than this fraction of the image from its start is
# a divergence (ECC slid onto another structure), not a correction.
MAX_CORRECTION_FRACTION = 0.25
# Pixels (at each pyramid level) by which the kept region of a reference mask is eroded: room for
# the correction ECC makes within a level, which moves the mask with the moving image, and for the
# Gaussian pre-filter, which spreads the ignored content into the pixels around it (at a coarse
# level, over many full-resolution pixels). On held-out pairs with 20 % replaced, 2 / 4 / 8 pixels:
# 88 / 96 / 100 % under 1 px after ECC (benchmarks/RESULTS.md).
ECC_MASK_MARGIN = 8
# Fewest pixels a correlation is computed over; below it the score is NaN (no evidence either way).
MIN_CORRELATION_PIXELS = 16
# Mask values at or above this count as "use" (masks are binary; the threshold of the inpainting masks).
MASK_KEEP_THRESHOLD = 0.5


def import_cv2():
    """``cv2``, or an ``ImportError`` that names the extra to install."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            f"ECC refinement needs OpenCV, which is not installed; install it with `{OPENCV_INSTALL_HINT}`"
        ) from error
    return cv2


@dataclass
class RefinementResult:
    """Result of :func:`refine_theta_ecc`.

    Args:
        theta (`torch.Tensor` of shape `(B, 2, 3)`, or `(B, 3, 3)` for ``motion="homography"``): the
            refined θ where ``converged``, else the initial θ (in that shape).
        converged (`torch.Tensor` of shape `(B,)`, bool): True where ECC converged to an accepted result.
        correlation (`torch.Tensor` of shape `(B,)`): ECC's correlation coefficient of the returned θ
            at full resolution (1 = perfect up to brightness and contrast); NaN where it could not be computed.
    """

    theta: torch.Tensor
    converged: torch.Tensor
    correlation: torch.Tensor


def to_gray(image: torch.Tensor | np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
    """``(3, H, W)`` / ``(1, H, W)`` tensor in ``[0, 1]`` or an ``(H, W[, 3])`` array → float32 gray ``(H, W)``
    (BT.601 luma, OpenCV's), resized to ``height × width`` when given (antialiased). The gray image every
    classical method of the project (ECC here, the benchmark's feature matchers) works on."""
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        if array.max() > 1.0:
            array = array / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]
    elif isinstance(image, torch.Tensor) and image.ndim == 3:
        tensor = image.detach().float().cpu()
    else:
        shape = tuple(image.shape) if hasattr(image, "shape") else type(image).__name__
        raise ValueError(f"expected an image of shape (3, H, W) or (H, W, 3), got {shape}")
    if tensor.shape[0] == 3:
        tensor = (0.299 * tensor[0] + 0.587 * tensor[1] + 0.114 * tensor[2])[None]
    if height is not None and tuple(tensor.shape[-2:]) != (height, width):
        tensor = F.interpolate(tensor[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        tensor = tensor[0]
    return np.ascontiguousarray(tensor[0].numpy(), dtype=np.float32)


def _pyramid(gray: np.ndarray, levels: int) -> list[np.ndarray]:
    """``levels`` images, finest first, each half the size of the previous (area-averaged)."""
    cv2 = import_cv2()
    images = [gray]
    for _ in range(levels - 1):
        height, width = images[-1].shape
        if min(height, width) < 32:  # ECC needs some pixels to work with
            break
        images.append(cv2.resize(images[-1], (width // 2, height // 2), interpolation=cv2.INTER_AREA))
    return images


def _pixel_matrix(theta: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The float32 pixel matrix OpenCV takes for ``theta`` at ``height × width``: 2×3 for an affine
    θ ``(1, 2, 3)``, 3×3 for a homography ``(1, 3, 3)``."""
    matrix = geometry.theta_to_pixel_matrix(theta.double(), height, width)[0]  # (3, 3)
    rows = 3 if geometry.is_homography(theta) else 2
    return np.ascontiguousarray(matrix[:rows].numpy(), dtype=np.float32)


def _warp_inverse_map(image: np.ndarray, matrix: np.ndarray, interpolation: int) -> np.ndarray:
    """``output(p) = image(matrix p)`` at the image's size: ``cv2.warpAffine`` for a 2×3 pixel
    matrix, ``cv2.warpPerspective`` for a 3×3 one (both with ``WARP_INVERSE_MAP``)."""
    cv2 = import_cv2()
    height, width = image.shape[:2]
    warp = cv2.warpPerspective if matrix.shape[0] == 3 else cv2.warpAffine
    return warp(image, matrix, (width, height), flags=interpolation | cv2.WARP_INVERSE_MAP)


def correlation(
    reference: np.ndarray, moving: np.ndarray, theta: torch.Tensor, reference_mask: np.ndarray | None = None
) -> float:
    """ECC's correlation coefficient between ``reference`` and ``moving`` warped by ``theta`` ``(1, 2, 3)``
    or ``(1, 3, 3)``, over the pixels the warped moving image covers (and, with ``reference_mask``,
    the reference pixels it keeps: uint8, nonzero = use). Gray float32 images of one size."""
    cv2 = import_cv2()
    height, width = reference.shape
    matrix = _pixel_matrix(theta, height, width)
    warped = _warp_inverse_map(moving, matrix, cv2.INTER_LINEAR)
    mask = _warp_inverse_map(np.ones_like(moving, dtype=np.uint8), matrix, cv2.INTER_NEAREST)
    if reference_mask is not None:
        mask = mask * (reference_mask > 0)
    if mask.sum() < MIN_CORRELATION_PIXELS:
        return float("nan")
    return float(cv2.computeECC(reference, warped, mask.astype(np.uint8)))


def _moving_frame_mask(kept: np.ndarray, matrix: np.ndarray, margin: int) -> np.ndarray:
    """A reference mask ``kept`` (uint8 ``(H, W)``, 1 = use) pulled into the moving frame through the
    pixel matrix ``matrix`` (2×3 or 3×3, reference → moving), its kept region eroded by ``margin``
    pixels: the ``inputMask`` ``findTransformECC`` expects (see the module docs)."""
    cv2 = import_cv2()
    square = np.vstack([matrix, [0.0, 0.0, 1.0]]) if matrix.shape[0] == 2 else matrix.astype(np.float64)
    inverse = np.linalg.inv(square)[: matrix.shape[0]].astype(np.float32)  # moving → reference
    moving_frame = _warp_inverse_map(kept, inverse, cv2.INTER_NEAREST)
    kernel = np.ones((2 * margin + 1,) * 2, np.uint8)
    return cv2.erode(moving_frame, kernel)


def _ecc_one(
    reference: np.ndarray,
    moving: np.ndarray,
    theta: torch.Tensor,
    levels: int,
    iterations: int,
    epsilon: float,
    motion: str,
    reference_mask: np.ndarray | None = None,
    mask_margin: int = ECC_MASK_MARGIN,
) -> torch.Tensor:
    """Coarse-to-fine ECC from ``theta``, ``(1, 2, 3)`` for ``motion="affine"`` and ``(1, 3, 3)`` for
    ``"homography"``, returned in the same shape, using only the reference pixels ``reference_mask``
    keeps (uint8 ``(H, W)``, 1 = use; all when ``None``); raises ``cv2.error`` where OpenCV gives up."""
    cv2 = import_cv2()
    motion_type = {"affine": cv2.MOTION_AFFINE, "homography": cv2.MOTION_HOMOGRAPHY}[motion]
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, epsilon)
    theta = theta.double()
    ref_pyramid, mov_pyramid = _pyramid(reference, levels)[::-1], _pyramid(moving, levels)[::-1]
    for index, (ref_level, mov_level) in enumerate(zip(ref_pyramid, mov_pyramid)):
        height, width = ref_level.shape
        gaussian_size = 1 if index == len(ref_pyramid) - 1 else ECC_GAUSSIAN_SIZE
        # θ is normalised: the same θ has this level's own pixel matrix (S P S⁻¹ of the finer one).
        warp_matrix = _pixel_matrix(theta, height, width)  # (2, 3) or (3, 3)
        input_mask = None
        if reference_mask is not None:
            kept = cv2.resize(reference_mask, (width, height), interpolation=cv2.INTER_NEAREST)
            input_mask = _moving_frame_mask(kept, warp_matrix, mask_margin)  # the moving frame, where OpenCV reads it
        _, warp_matrix = cv2.findTransformECC(
            ref_level, mov_level, warp_matrix, motion_type, criteria, input_mask, gaussian_size
        )
        matrix = torch.from_numpy(warp_matrix).double()[None]
        theta = geometry.pixel_matrix_to_theta(matrix, height, width, transform=motion)
    return theta.float()


def refine_theta_ecc(
    reference: torch.Tensor | np.ndarray | list,
    moving: torch.Tensor | np.ndarray | list,
    theta: torch.Tensor | None = None,
    *,
    levels: int = 3,
    iterations: int = 100,
    epsilon: float = 1e-5,
    max_side: int | None = 1024,
    max_correction: float | None = None,
    motion: str = "affine",
    reference_mask: torch.Tensor | np.ndarray | list | None = None,
    mask_margin: int = ECC_MASK_MARGIN,
) -> RefinementResult:
    r"""Refine θ with OpenCV's ECC, coarse to fine, and keep it only when it helps.

    Args:
        reference: ``(B, 3, H, W)`` / ``(3, H, W)`` tensors in ``[0, 1]`` (or a list of them, or
            ``(H, W, 3)`` arrays): the image(s) the moving ones are aligned onto.
        moving: the moving image(s), same count; any size (resized to the reference's, see the module docs).
        theta (`torch.Tensor` of shape `(B, 2, 3)`, or `(B, 3, 3)` for ``motion="homography"``): the
            initial estimate; identity when ``None``. An affine θ starts a homography refinement as
            the homography with last row ``[0, 0, 1]``.
        levels: pyramid levels (1 = full resolution only); each halves the size. Where a start other
            than the identity is not refined (ECC fails or its result is rejected), the finer
            ``levels - 1`` are tried once more: a low-texture coarsest level can run off alone.
        iterations, epsilon: ECC's stopping criteria per level.
        max_side: pixels; larger images are downscaled to this longer side first (θ is normalised,
            so the result still applies at full resolution). ``None`` keeps the full size.
        max_correction: pixels at the working size; a result whose corners moved further than this
            from ``theta`` (mean over the four image corners) is rejected as a divergence. Default: a
            quarter of the longer side.
        motion: one of :data:`ECC_MOTIONS`: ``"affine"`` (``cv2.MOTION_AFFINE``, θ ``(B, 2, 3)``) or
            ``"homography"`` (``cv2.MOTION_HOMOGRAPHY``, θ ``(B, 3, 3)``).
        reference_mask: the reference pixels ECC may use, 1 (``>= 0.5``) = use, 0 = ignore (an edited
            region): per reference an ``(H, W)`` or ``(1, H, W)`` tensor or array at the reference's
            size, a list of them (one shared, or one per reference) or a ``(B, 1, H, W)`` tensor.
            ``None`` uses every pixel. See the module docs for how OpenCV gets it.
        mask_margin: pixels, at each pyramid level, by which the kept region of ``reference_mask`` is
            eroded (default :data:`ECC_MASK_MARGIN`); a region already grown, such as one found from
            a difference, needs less.

    Returns:
        :class:`RefinementResult`, θ ``(B, 2, 3)`` for ``"affine"`` and ``(B, 3, 3)`` for ``"homography"``.
        Where ECC raises (``cv2.error``), returns a non-finite matrix, moves implausibly far, or lowers
        the correlation below the initial θ's, the initial θ is kept and ``converged`` is False: a
        batch never stops on one bad image.
    """
    if motion not in ECC_MOTIONS:
        raise ValueError(f"expected motion in {ECC_MOTIONS}, got {motion!r}")
    cv2 = import_cv2()
    references = _as_list(reference, "reference")
    movings = _as_list(moving, "moving")
    if len(references) != len(movings):
        raise ValueError(f"expected as many moving images as references ({len(references)}), got {len(movings)}")
    batch = len(references)
    if theta is None:
        theta = geometry.identity_theta(batch)
    shapes = [(batch, 2, 3)] + ([(batch, 3, 3)] if motion == "homography" else [])
    if not isinstance(theta, torch.Tensor) or tuple(theta.shape) not in shapes:
        shape = tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__
        expected = " or ".join(str(s) for s in shapes)
        homography_given = isinstance(theta, torch.Tensor) and shape == (batch, 3, 3)
        hint = "; pass motion='homography' to refine a homography" if homography_given else ""
        raise ValueError(f"expected theta of shape {expected} for motion={motion!r}, got {shape}{hint}")
    if int(levels) < 1:
        raise ValueError(f"expected levels >= 1, got {levels}")
    if isinstance(mask_margin, bool) or not isinstance(mask_margin, int) or mask_margin < 0:
        raise ValueError(f"expected mask_margin as an int >= 0 (pixels), got {mask_margin!r}")
    theta = theta.detach().float().cpu()
    if motion == "homography":
        theta = geometry.to_homogeneous(theta)  # (B, 3, 3): a failed image keeps its θ in this shape
    sizes = [tuple(r.shape[-2:]) if isinstance(r, torch.Tensor) else tuple(r.shape[:2]) for r in references]
    masks = _reference_masks(reference_mask, sizes) if reference_mask is not None else [None] * batch

    refined, converged, scores = [], [], []
    for ref_image, mov_image, init, mask, size in zip(references, movings, theta.split(1), masks, sizes):
        scale = min(1.0, max_side / max(size)) if max_side else 1.0
        height, width = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
        ref_gray = to_gray(ref_image, height, width)
        mov_gray = to_gray(mov_image, height, width)
        kept = None if mask is None else cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        limit = max_correction if max_correction is not None else MAX_CORRECTION_FRACTION * max(height, width)
        initial_score = correlation(ref_gray, mov_gray, init, kept)
        # A start that is not the identity is one an estimator moved to: where ECC's coarsest level
        # runs off from it (a low-texture level), the finer levels alone are tried once more. From
        # the identity, a divergence is mostly ECC moving an aligned pair toward a local change,
        # which the finer levels would only repeat, at twice the time.
        retry = int(levels) > 1 and not torch.equal(init[0, :2], geometry.identity_theta(1)[0])
        for attempt_levels in (int(levels), int(levels) - 1)[: 2 if retry else 1]:
            try:
                candidate = _ecc_one(
                    ref_gray, mov_gray, init, attempt_levels, iterations, epsilon, motion, kept, mask_margin
                )
            except cv2.error:
                candidate = None
            accepted = False
            if candidate is not None and torch.isfinite(candidate).all():
                moved = geometry.corner_error(candidate, init, height, width).item()
                score = correlation(ref_gray, mov_gray, candidate, kept)
                # A NaN initial score (no overlap at all) cannot veto a finite refined one.
                accepted = moved <= limit and np.isfinite(score) and not (score < initial_score)
            if accepted:
                break
        refined.append(candidate if accepted else init)
        converged.append(accepted)
        scores.append(score if accepted else initial_score)
    return RefinementResult(
        theta=torch.cat(refined),
        converged=torch.tensor(converged, dtype=torch.bool),
        correlation=torch.tensor(scores, dtype=torch.float32),
    )


def _reference_masks(masks, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """``reference_mask`` → one uint8 ``(H, W)`` mask per reference (1 = use), each checked against its
    reference's size ``sizes[i]`` and for keeping some pixels."""
    items = _as_list(masks, "reference_mask")
    if len(items) not in (1, len(sizes)):
        raise ValueError(f"expected 1 or {len(sizes)} reference_masks (one per reference), got {len(items)}")
    if len(items) == 1:
        items = items * len(sizes)
    arrays = []
    for index, (mask, size) in enumerate(zip(items, sizes)):
        where = f"reference_mask[{index}]" if len(sizes) > 1 else "reference_mask"
        array = mask.detach().float().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask, float)
        if array.ndim == 3 and array.shape[0] == 1:
            array = array[0]
        if array.shape != size:
            raise ValueError(
                f"expected {where} of shape {size} or {(1, *size)} (its reference's size), got {tuple(array.shape)}"
            )
        kept = (array >= MASK_KEEP_THRESHOLD).astype(np.uint8)
        if not kept.any():
            raise ValueError(f"expected {where} to keep some pixels (1 = use), got a mask that ignores them all")
        arrays.append(kept)
    return arrays


def _as_list(images, name: str) -> list:
    """A batch tensor ``(B, 3, H, W)``, one image or a list → a list of single images."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return [images]
    if isinstance(images, (list, tuple)) and images:
        return list(images)
    raise ValueError(
        f"expected {name} as a (B, 3, H, W) tensor, one image or a non-empty list, got {type(images).__name__}"
    )
