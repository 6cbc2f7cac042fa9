"""Affine and projective geometry on image and latent tensors: pure functions, no modules.

Convention (θ), used everywhere in this package:
    ``theta`` is a ``(B, 2, 3)`` matrix in PyTorch's normalised coordinates with
    ``align_corners=False``: ``x, y ∈ [-1, 1]`` span the outer edges of the image, ``(-1, -1)`` is
    the top-left corner of the top-left pixel. θ maps each *output* (aligned) position to the
    *input* (moving) position it samples, exactly as ``F.affine_grid(theta, ...)`` reads it::

        output(p) = input(θ · [p, 1])          p = (x, y) in the output frame

    Because the coordinates are normalised, one θ applies at every resolution: the θ estimated
    on 64×64 latents warps the 512×512 (or 4000×3000) image it was encoded from.

    If a moving image ``M`` shows a reference ``R`` moved by the affine map ``A`` (``M(A q) = R(q)``,
    what ``cv2.warpAffine(R, A_pixels)`` produces), the θ that aligns ``M`` back onto ``R`` is ``A``
    itself (in normalised coordinates), and ``warp(R, invert_theta(A))`` synthesises ``M``.

    Composition: ``warp(warp(x, first), second) == warp(x, compose_theta(first, second))``
    (up to resampling), i.e. the matrix product ``first @ second`` in homogeneous form.

Homographies:
    A ``(B, 3, 3)`` θ is a homography ``H`` in the same normalised coordinates and the same
    direction: ``output(p) = input(π(H · [p, 1]))`` with ``π(x, y, w) = (x / w, y / w)``. An affine
    θ is the homography with last row ``[0, 0, 1]`` (:func:`to_homogeneous`), so every function
    here accepts both shapes: ``warp``, ``compose_theta``, ``invert_theta``, ``corner_error``,
    ``valid_mask`` and the pixel-matrix conversions. Results keep the affine shape ``(B, 2, 3)``
    when every input is affine, and are ``(B, 3, 3)``, scaled so that ``H[2, 2] = 1``, otherwise.

Pixel matrices (OpenCV / PIL):
    ``theta_to_pixel_matrix`` returns the ``(B, 3, 3)`` matrix ``P`` in pixel coordinates (pixel
    centres at integers, OpenCV's convention) with ``output(p) = input(P p)``. Apply it with
    ``cv2.warpAffine(img, P[:2], (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)`` or with
    ``PIL.Image.transform(size, Image.AFFINE, P[:2].flatten())``; ``inv(P)[:2]`` is the forward
    matrix ``cv2.warpAffine`` takes without the inverse flag. For a homography θ, ``P`` goes to
    ``cv2.warpPerspective(img, P, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PADDING_MODES = ("zeros", "border", "reflection")
INTERPOLATION_MODES = ("bilinear", "nearest", "bicubic")
# Shapes of θ: an affine (B, 2, 3) matrix or a homography (B, 3, 3).
MATRIX_TRANSFORMS = ("affine", "homography")
# A homography whose denominator comes this close to zero inside the image folds the plane over.
MIN_PROJECTIVE_DENOMINATOR = 1e-6


def _check_theta(theta: torch.Tensor, name: str = "theta") -> None:
    if not isinstance(theta, torch.Tensor):
        raise TypeError(
            f"expected {name} to be a torch.Tensor of shape (B, 2, 3) or (B, 3, 3), got {type(theta).__name__}"
        )
    if theta.ndim != 3 or tuple(theta.shape[1:]) not in ((2, 3), (3, 3)):
        raise ValueError(f"expected {name} of shape (B, 2, 3) or (B, 3, 3), got {tuple(theta.shape)}")


def is_homography(theta: torch.Tensor) -> bool:
    """Whether ``theta`` has the homography shape ``(B, 3, 3)`` (rather than affine ``(B, 2, 3)``)."""
    _check_theta(theta)
    return theta.shape[1] == 3


def _normalise_homography(matrix: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 3)`` scaled so that ``H[2, 2] = 1`` (a homography is defined up to scale)."""
    return matrix / matrix[:, 2:, 2:]


def identity_theta(
    batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The identity transform, ``(B, 2, 3)``."""
    eye = torch.eye(2, 3, device=device, dtype=dtype)
    return eye.unsqueeze(0).repeat(batch_size, 1, 1)


def to_homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` → ``(B, 3, 3)`` with last row ``[0, 0, 1]``; ``(B, 3, 3)`` passes through."""
    _check_theta(theta)
    if theta.shape[1] == 3:
        return theta
    last_row = torch.zeros_like(theta[:, :1, :])
    last_row[..., 2] = 1
    return torch.cat([theta, last_row], dim=1)


def compose_theta(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """θ of warping by ``first`` and then by ``second``: ``first @ second``.

    ``(B, 2, 3)`` when both are affine, else a homography ``(B, 3, 3)``. Also the cascade update:
    if ``x' = warp(x, θ)`` and a residual ``δ`` aligns ``x'``, then ``compose_theta(θ, δ)`` aligns
    ``x`` directly.
    """
    _check_theta(first, "first")
    _check_theta(second, "second")
    product = torch.matmul(to_homogeneous(first), to_homogeneous(second))
    if is_homography(first) or is_homography(second):
        return _normalise_homography(product)
    return product[:, :2, :]


def invert_theta(theta: torch.Tensor) -> torch.Tensor:
    """Inverse transform, same shape as ``theta``: ``compose_theta(θ, invert_theta(θ))`` is the identity."""
    _check_theta(theta)
    if is_homography(theta):
        return _normalise_homography(torch.linalg.inv(theta))
    linear, translation = theta[:, :2, :2], theta[:, :2, 2:]
    linear_inv = torch.linalg.inv(linear)
    return torch.cat([linear_inv, -linear_inv @ translation], dim=2)


def apply_theta(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map ``points`` ``(B, N, 2)`` (normalised) through ``theta`` ``(B, 2, 3)`` or ``(B, 3, 3)``.

    Returns ``(B, N, 2)``: ``θ · [p, 1]``, divided by its third coordinate for a homography.
    """
    _check_theta(theta)
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1)  # (B, N, 3)
    mapped = homogeneous @ theta.transpose(1, 2)  # (B, N, 2 or 3)
    if not is_homography(theta):
        return mapped
    denominator = mapped[..., 2:]
    # Keep the sign but never divide by (almost) zero: such points lie on the horizon line.
    floor = torch.where(denominator < 0, -MIN_PROJECTIVE_DENOMINATOR, MIN_PROJECTIVE_DENOMINATOR)
    safe = torch.where(denominator.abs() < MIN_PROJECTIVE_DENOMINATOR, floor, denominator)
    return mapped[..., :2] / safe


def warp(
    image: torch.Tensor,
    theta: torch.Tensor,
    size: tuple[int, int] | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Warp ``image`` ``(B, C, H, W)`` by ``theta`` ``(B, 2, 3)`` or ``(B, 3, 3)`` (see the module convention).

    Works on latents and pixels alike, at any resolution. ``size=(H_out, W_out)`` sets the output
    size (default: the input's). Positions that sample outside the input get ``padding_mode``
    (``"zeros"``, ``"border"`` or ``"reflection"``). Returns ``(B, C, H_out, W_out)``.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"expected image of shape (B, C, H, W), got {shape}")
    _check_theta(theta)
    if theta.shape[0] != image.shape[0]:
        raise ValueError(f"expected theta with batch size {image.shape[0]} (the image's), got {theta.shape[0]}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"expected padding_mode in {PADDING_MODES}, got {padding_mode!r}")
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"expected mode in {INTERPOLATION_MODES}, got {mode!r}")
    height, width = size if size is not None else image.shape[-2:]
    size = [image.shape[0], image.shape[1], height, width]
    if is_homography(theta):
        # The identity grid's output positions, sent through H one by one (affine_grid is affine only).
        identity = identity_theta(image.shape[0], image.device, image.dtype)
        positions = F.affine_grid(identity, size, align_corners=False).flatten(1, 2)  # (B, H·W, 2)
        grid = apply_theta(theta.to(image.dtype), positions).view(image.shape[0], height, width, 2)
    else:
        grid = F.affine_grid(theta.to(image.dtype), size, align_corners=False)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def valid_mask(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 1, H, W)`` mask of an ``H × W`` output warped by ``theta``: 1 where every input pixel
    that bilinear sampling reads lies inside the input, 0 where padding enters (the exposed border)."""
    ones = torch.ones(theta.shape[0], 1, height, width, device=theta.device, dtype=theta.dtype)
    coverage = warp(ones, theta, mode="bilinear", padding_mode="zeros")
    return (coverage > 1 - 1e-4).to(theta.dtype)


def _normalisation_matrix(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``N`` with ``normalised = N @ pixel`` for pixel centres at integers (align_corners=False)."""
    return torch.tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]],
        device=like.device,
        dtype=like.dtype,
    )


def theta_to_pixel_matrix(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 3, 3)`` pixel-coordinate matrix ``P`` of ``theta`` for an ``H × W`` image.

    ``output(p) = input(P p)`` with pixel centres at integer coordinates (OpenCV's convention).
    """
    _check_theta(theta)
    norm = _normalisation_matrix(height, width, theta)
    return torch.linalg.inv(norm) @ to_homogeneous(theta) @ norm


def pixel_linear_part(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, 2, 2)``: the linear part of :func:`theta_to_pixel_matrix` for an affine ``theta``
    ``(B, 2, 3)`` and an ``H × W`` image, without building or inverting the 3×3 matrices. Normalising
    scales x by ``2 / W`` and y by ``2 / H``, so the diagonal stays and the off-diagonal entries
    scale by the aspect ratio."""
    aspect = width / height
    return theta[:, :, :2] * theta.new_tensor([[1.0, aspect], [1.0 / aspect, 1.0]])


def singular_values_2x2(matrix: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` singular values of ``(B, 2, 2)`` matrices, largest first, in closed form (a LAPACK
    SVD costs far more for a 2×2): ``s² = (F ± √(F² − 4 det²)) / 2`` with ``F`` the squared
    Frobenius norm."""
    frobenius = matrix.pow(2).sum(dim=(1, 2))
    determinant = matrix[:, 0, 0] * matrix[:, 1, 1] - matrix[:, 0, 1] * matrix[:, 1, 0]
    spread = (frobenius.pow(2) - 4 * determinant.pow(2)).clamp_min(0).sqrt()
    return torch.stack([(frobenius + spread) / 2, ((frobenius - spread) / 2).clamp_min(0)], dim=1).sqrt()


def pixel_matrix_to_theta(matrix: torch.Tensor, height: int, width: int, transform: str = "affine") -> torch.Tensor:
    """Inverse of :func:`theta_to_pixel_matrix`: a ``(B, 3, 3)`` or ``(B, 2, 3)`` pixel matrix → θ.

    ``transform="affine"`` returns ``(B, 2, 3)`` and expects an affine matrix (a ``(B, 3, 3)`` one
    must have last row ``[0, 0, 1]``); ``"homography"`` returns ``(B, 3, 3)`` (``cv2.findHomography``).
    """
    _check_theta(matrix, "matrix")
    if transform not in MATRIX_TRANSFORMS:
        raise ValueError(f"expected transform in {MATRIX_TRANSFORMS}, got {transform!r}")
    homogeneous = to_homogeneous(matrix)
    if transform == "affine":
        last_row = homogeneous[:, 2, :]
        affine_row = torch.tensor([0.0, 0.0, 1.0], dtype=last_row.dtype, device=last_row.device)
        if not torch.allclose(last_row / last_row[:, 2:], affine_row.expand_as(last_row), atol=1e-9, rtol=0):
            raise ValueError(
                f"expected an affine matrix (last row [0, 0, 1]) for transform='affine', got last row(s) "
                f"{last_row.tolist()}; pass transform='homography' for a projective matrix"
            )
    norm = _normalisation_matrix(height, width, matrix)
    theta = norm @ homogeneous @ torch.linalg.inv(norm)
    return _normalise_homography(theta) if transform == "homography" else theta[:, :2, :]


# The four image corners in normalised coordinates: top-left, top-right, bottom-right, bottom-left.
_IMAGE_CORNERS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


def corner_positions(theta: torch.Tensor) -> torch.Tensor:
    """Where ``theta`` sends the four output-image corners, ``(B, 4, 2)`` in normalised coordinates."""
    _check_theta(theta)
    corners = _IMAGE_CORNERS.to(device=theta.device, dtype=theta.dtype)
    return apply_theta(theta, corners.expand(theta.shape[0], -1, -1))


def corner_error(theta_pred: torch.Tensor, theta_true: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mean corner error (MACE) in pixels of an ``H × W`` image, ``(B,)``.

    The mean over the four image corners of the distance between where ``theta_pred`` and
    ``theta_true`` send the corner. Zero for the truth; for a pure translation error of ``k``
    pixels, ``k``. Differentiable, so it doubles as a training loss.
    """
    if theta_pred.shape[0] != theta_true.shape[0]:
        raise ValueError(f"expected theta_pred with batch size {theta_true.shape[0]}, got {theta_pred.shape[0]}")
    difference = corner_positions(theta_pred) - corner_positions(theta_true)  # (B, 4, 2), normalised
    pixels_per_unit = torch.tensor([width / 2.0, height / 2.0], device=difference.device, dtype=difference.dtype)
    return (difference * pixels_per_unit).norm(dim=-1).mean(dim=-1)


@dataclass(frozen=True)
class WarpRange:
    """Ranges for :func:`random_theta`, all centred on the identity.

    Attributes:
        rotation: maximum absolute rotation in degrees.
        scale: ``(low, high)`` scale, drawn independently for each axis.
        anisotropy: ``(low, high)`` extra factor ``a``; the x axis is scaled by ``√a`` and y by ``1/√a``.
        shear: maximum absolute shear factor.
        translation: maximum absolute translation per axis, as a fraction of the image size.
        perspective: maximum extra displacement of each image corner per axis, as a fraction of
            the image size; above 0, :func:`random_theta` returns homographies ``(B, 3, 3)``.
    """

    rotation: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    anisotropy: tuple[float, float] = (1.0, 1.0)
    shear: float = 0.05
    translation: float = 0.10
    perspective: float = 0.0

    def scaled(self, amount: float) -> "WarpRange":
        """The ranges shrunk towards the identity by ``amount ∈ [0, 1]`` (a curriculum step)."""

        def towards_one(bounds: tuple[float, float]) -> tuple[float, float]:
            return (1.0 + (bounds[0] - 1.0) * amount, 1.0 + (bounds[1] - 1.0) * amount)

        return WarpRange(
            rotation=self.rotation * amount,
            scale=towards_one(self.scale),
            anisotropy=towards_one(self.anisotropy),
            shear=self.shear * amount,
            translation=self.translation * amount,
            perspective=self.perspective * amount,
        )


WARP_PRESETS = {
    "none": WarpRange(rotation=0.0, scale=(1.0, 1.0), shear=0.0, translation=0.0),
    "small": WarpRange(rotation=5.0, scale=(0.97, 1.03), shear=0.02, translation=0.03),
    "standard": WarpRange(rotation=15.0, scale=(0.9, 1.1), shear=0.05, translation=0.10),
    "large": WarpRange(rotation=30.0, scale=(0.8, 1.25), shear=0.1, translation=0.15),
    # Beyond what a registration model is trained on: measures where its basin ends.
    "huge": WarpRange(rotation=45.0, scale=(0.7, 1.4), shear=0.1, translation=0.25),
    # `standard` seen from a step aside: each corner moves up to 5 % of the side more (homographies).
    "projective": WarpRange(rotation=15.0, scale=(0.9, 1.1), shear=0.05, translation=0.10, perspective=0.05),
}


def get_warp_range(warp: str | WarpRange) -> WarpRange:
    """A :class:`WarpRange` from a preset name (a key of :data:`WARP_PRESETS`) or itself."""
    if isinstance(warp, WarpRange):
        return warp
    if warp not in WARP_PRESETS:
        raise ValueError(f"expected warp in {tuple(WARP_PRESETS)}, got {warp!r}")
    return WARP_PRESETS[warp]


def _uniform(batch_size: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch_size, generator=generator, dtype=torch.float64)


def random_theta(
    batch_size: int,
    warp_range: WarpRange | str = "standard",
    height: int = 512,
    width: int = 512,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random misalignments about the image centre: affine ``(B, 2, 3)``, or homographies
    ``(B, 3, 3)`` when ``warp_range.perspective > 0``; float32 on the CPU.

    The motion ``A = T · R · H · S`` (scale, then shear, then rotation, then translation) is built
    in pixel units, so a rotation is a true rotation for non-square ``H × W``, then expressed in
    the θ convention. The returned θ is the one that *aligns* the moved image (see the module
    docstring): synthesise the moving image with ``warp(reference, invert_theta(theta))``.
    With perspective, each image corner's image under ``A`` moves by up to ``perspective`` of the
    side per axis, and θ is the homography through the four moved corners.
    Deterministic for a given ``generator`` state; affine ranges draw exactly what they always drew.
    """
    warp_range = get_warp_range(warp_range)
    angle = torch.deg2rad(_uniform(batch_size, -warp_range.rotation, warp_range.rotation, generator))
    scale_x = _uniform(batch_size, *warp_range.scale, generator)
    scale_y = _uniform(batch_size, *warp_range.scale, generator)
    anisotropy = _uniform(batch_size, *warp_range.anisotropy, generator).sqrt()
    shear = _uniform(batch_size, -warp_range.shear, warp_range.shear, generator)
    shift_x = _uniform(batch_size, -warp_range.translation, warp_range.translation, generator) * 2.0
    shift_y = _uniform(batch_size, -warp_range.translation, warp_range.translation, generator) * 2.0

    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear_matrix = torch.stack(
        [
            torch.stack([torch.ones_like(shear), shear], -1),
            torch.stack([torch.zeros_like(shear), torch.ones_like(shear)], -1),
        ],
        -2,
    )
    scaling = torch.diag_embed(torch.stack([scale_x * anisotropy, scale_y / anisotropy], -1))
    linear_pixels = rotation @ shear_matrix @ scaling  # (B, 2, 2) in square pixel units

    # Pixel units → normalised units per axis: x_n = x_p · 2 / W, so L_n = D L_p D⁻¹ with D = diag(2/W, 2/H).
    to_normalised = torch.diag(torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64))
    linear = to_normalised @ linear_pixels @ torch.linalg.inv(to_normalised)
    translation = torch.stack([shift_x, shift_y], -1).unsqueeze(-1)  # normalised: fraction · 2
    theta = torch.cat([linear, translation], dim=2)
    if warp_range.perspective <= 0:
        return theta.float()
    # Drawn after the affine part, so the affine part of a seeded draw does not depend on perspective.
    jitter = _uniform(batch_size * 8, -warp_range.perspective, warp_range.perspective, generator) * 2.0
    corners = _IMAGE_CORNERS.to(torch.float64).expand(batch_size, -1, -1)
    moved = apply_theta(theta, corners) + jitter.view(batch_size, 4, 2)
    return fit_homography(corners, moved, regularization=0.0).float()


def _match_weights(source: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Check matched points ``(B, N, 2)`` × 2 and return their weights ``(B, N)``, summing to one."""
    if source.shape != target.shape or source.ndim != 3 or source.shape[-1] != 2:
        raise ValueError(
            "expected source and target of the same shape (B, N, 2), "
            f"got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    if weights is None:
        weights = source.new_ones(source.shape[:2])
    return weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)


def _solve_weighted(
    rows_u: torch.Tensor,
    rows_v: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
    prior: torch.Tensor,
    regularization: float,
) -> torch.Tensor:
    """Weighted linear least squares ``rows · params ≈ target`` for both coordinates, pulled towards
    ``prior`` by ``regularization``: rows ``(B, N, K)`` × 2, target ``(B, N, 2)`` → params ``(B, K)``."""
    design = torch.cat([rows_u, rows_v], dim=1)  # (B, 2N, K)
    values = torch.cat([target[..., 0], target[..., 1]], dim=1)  # (B, 2N)
    w = torch.cat([weights, weights], dim=1)
    normal = design.transpose(1, 2) @ (w.unsqueeze(-1) * design)
    rhs = design.transpose(1, 2) @ (w * values).unsqueeze(-1)
    eye = torch.eye(design.shape[-1], device=design.device, dtype=design.dtype)
    return torch.linalg.solve(normal + regularization * eye, rhs + regularization * prior.unsqueeze(-1)).squeeze(-1)


def fit_affine(
    source: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    transform: str = "affine",
    aspect: float = 1.0,
    regularization: float = 1e-6,
) -> torch.Tensor:
    """Weighted least-squares θ with ``target ≈ θ · [source, 1]``, ``(B, 2, 3)``; differentiable.

    Args:
        source: ``(B, N, 2)`` points in normalised coordinates.
        target: ``(B, N, 2)`` where each point should map to.
        weights: ``(B, N)`` non-negative weights (default: all ones).
        transform: ``"affine"`` (6 dof), ``"similarity"`` (rotation, isotropic scale, translation;
            isotropic in pixels, hence ``aspect = W / H``) or ``"translation"``.
        regularization: a small pull towards the identity that keeps degenerate point sets solvable.
    """
    weights = _match_weights(source, target, weights)
    batch_size = source.shape[0]
    if transform == "translation":
        shift = (weights.unsqueeze(-1) * (target - source)).sum(dim=1)  # (B, 2)
        theta = identity_theta(batch_size, source.device, source.dtype)
        theta[:, :, 2] = shift
        return theta

    # Work in a frame where pixels are square so a "similarity" is a true one: u = (x · aspect, y).
    stretch = source.new_tensor([aspect, 1.0])
    src, dst = source * stretch, target * stretch
    ones, zeros = torch.ones_like(src[..., 0]), torch.zeros_like(src[..., 0])
    x, y = src[..., 0], src[..., 1]
    if transform == "affine":
        # Unknowns (a, b, c, d, e, f): u' = a x + b y + c, v' = d x + e y + f.
        rows_u = torch.stack([x, y, ones, zeros, zeros, zeros], -1)
        rows_v = torch.stack([zeros, zeros, zeros, x, y, ones], -1)
        prior = source.new_tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    elif transform == "similarity":
        # Unknowns (a, b, c, f): u' = a x - b y + c, v' = b x + a y + f.
        rows_u = torch.stack([x, -y, ones, zeros], -1)
        rows_v = torch.stack([y, x, zeros, ones], -1)
        prior = source.new_tensor([1.0, 0.0, 0.0, 0.0])
    else:
        raise ValueError(f"expected transform in ('affine', 'similarity', 'translation'), got {transform!r}")
    params = _solve_weighted(rows_u, rows_v, dst, weights, prior, regularization)
    if transform == "affine":
        matrix = params.view(batch_size, 2, 3)
    else:
        a, b, c, f = params.unbind(-1)
        matrix = torch.stack([torch.stack([a, -b, c], -1), torch.stack([b, a, f], -1)], -2)
    # Back from the square-pixel frame: θ = D⁻¹ M D with D = diag(aspect, 1).
    unstretch = torch.diag(source.new_tensor([1.0 / aspect, 1.0]))
    linear = unstretch @ matrix[:, :, :2] @ torch.diag(stretch)
    return torch.cat([linear, unstretch @ matrix[:, :, 2:]], dim=2)


def fit_homography(
    source: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    regularization: float = 1e-6,
) -> torch.Tensor:
    """Weighted least-squares homography with ``target ≈ π(H · [source, 1])``, ``(B, 3, 3)``; differentiable.

    Minimises the algebraic error of the direct linear transform with ``H[2, 2] = 1`` (8 unknowns),
    which is well conditioned here because normalised coordinates already lie in ``[-1, 1]``.
    Four points in general position give the exact homography (``regularization=0``).

    Args:
        source: ``(B, N, 2)`` points in normalised coordinates, ``N >= 4``.
        target: ``(B, N, 2)`` where each point should map to.
        weights: ``(B, N)`` non-negative weights (default: all ones).
        regularization: a small pull towards the identity that keeps degenerate point sets solvable.
    """
    weights = _match_weights(source, target, weights)
    batch_size, num_points, _ = source.shape
    if num_points < 4:
        raise ValueError(f"expected at least 4 points for a homography (8 unknowns), got {num_points}")
    x, y = source[..., 0], source[..., 1]
    u, v = target[..., 0], target[..., 1]
    ones, zeros = torch.ones_like(x), torch.zeros_like(x)
    # Unknowns (h11, h12, h13, h21, h22, h23, h31, h32): u (h31 x + h32 y + 1) = h11 x + h12 y + h13, same for v.
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -x * u, -y * u], -1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -x * v, -y * v], -1)
    prior = source.new_tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    params = _solve_weighted(rows_u, rows_v, target, weights, prior, regularization)
    return torch.cat([params, params.new_ones(batch_size, 1)], dim=1).view(batch_size, 3, 3)


def params_to_theta(params: torch.Tensor, transform: str = "affine", aspect: float = 1.0) -> torch.Tensor:
    """θ ``(B, 2, 3)`` from a regression head's output.

    ``affine``: 6 values, θ row-major. ``similarity``: ``(a, b, tx, ty)`` for ``[[a, -b], [b, a]]``
    in square-pixel units (``aspect = W / H``). ``translation``: ``(tx, ty)``.
    """
    expected = {"affine": 6, "similarity": 4, "translation": 2}
    if transform not in expected:
        raise ValueError(f"expected transform in {tuple(expected)}, got {transform!r}")
    if params.ndim != 2 or params.shape[1] != expected[transform]:
        raise ValueError(
            f"expected params of shape (B, {expected[transform]}) for {transform!r}, got {tuple(params.shape)}"
        )
    if transform == "affine":
        return params.view(-1, 2, 3)
    if transform == "translation":
        theta = identity_theta(params.shape[0], params.device, params.dtype)
        return theta + F.pad(params.unsqueeze(-1), (2, 0))
    a, b, tx, ty = params.unbind(-1)
    return torch.stack([torch.stack([a, -b / aspect, tx], -1), torch.stack([b * aspect, a, ty], -1)], -2)


def identity_params(transform: str) -> list[float]:
    """The head output that :func:`params_to_theta` maps to the identity."""
    identities = {
        "affine": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        "similarity": [1.0, 0.0, 0.0, 0.0],
        "translation": [0.0, 0.0],
    }
    return identities[transform]
