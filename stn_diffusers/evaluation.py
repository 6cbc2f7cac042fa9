"""The alignment benchmark: learned aligners against OpenCV ECC, SIFT/ORB, phase correlation and kornia.

Every method sees the same seeded pairs (:func:`stn_diffusers.data.seeded_pairs`) and is scored with
the metric of the registration literature, the mean corner error (MACE, :func:`geometry.corner_error`)
in pixels at the pair resolution. A method that raises or does not converge counts as a failure and
is scored as the identity. Each method's errors are summarised with
:func:`stn_diffusers.metrics.summarize_errors` (``mean``, ``median``, ``p90``, ``under_{1,2,5}px``);
its time per pair is :data:`~stn_diffusers.metrics.TIME_PER_PAIR` (estimation with the latents
given) and, for learned aligners, :data:`~stn_diffusers.metrics.TIME_PER_PAIR_WITH_ENCODE`.

    stn-diffusers evaluate --pipeline tuned=data/default_stn_run --data data/photos/heldout --json out.json

Convention: every estimator returns θ ``(1, 2, 3)`` (or a homography ``(1, 3, 3)``) aligning the
moving image onto the reference (see :mod:`stn_diffusers.geometry`); its pixel matrix maps a
reference pixel to the moving-image position that shows it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import geometry, metrics
from .data import Pair, seeded_pairs
from .refine import OPENCV_INSTALL_HINT, import_cv2, motion_of, refine_theta_ecc, to_gray

logger = logging.getLogger(__name__)

# Methods that need an STN pipeline: the STN alone, the STN then ECC, and the latent floor of its VAE.
STN_METHODS = ("stn", "stn+ecc", "latent-floor")
DEFAULT_METHODS = ("identity", *STN_METHODS, "ecc", "sift", "orb", "phase", "kornia")
# The latent floor: L-BFGS on the latent alignment error, started at the true θ (see latent_floor_theta).
LATENT_FLOOR_ITERATIONS = 50
DEFAULT_NUM_PAIRS = 24
# kornia's gradient-descent registration runs a few seconds per 512×512 pair on a CPU: cap its
# iterations per pyramid level so the benchmark finishes, and say so in the table.
KORNIA_ITERATIONS = 50
KORNIA_PYRAMID_LEVELS = 3
# Feature matching: Lowe's ratio test, the RANSAC reprojection threshold (pixels), and the fewest
# matches that determine each transform.
RATIO_TEST = 0.75
RANSAC_THRESHOLD = 3.0
MIN_MATCHES = {"affine": 3, "homography": 4}


class EstimationError(RuntimeError):
    """A method could not produce an estimate for a pair (scored as identity, counted as a failure)."""


# ------------------------------------------------------------------------------------ estimators
def _gray_uint8(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in ``[0, 1]`` → ``(H, W)`` uint8 gray (what OpenCV's feature detectors take)."""
    gray = torch.from_numpy(to_gray(image))
    return (gray.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _gray_float(image: torch.Tensor) -> np.ndarray:
    return (_gray_uint8(image).astype(np.float32)) / 255.0


def _matrix_to_theta(matrix: np.ndarray, height: int, width: int, transform: str = "affine") -> torch.Tensor:
    matrix = torch.from_numpy(np.asarray(matrix, dtype=np.float64))[None]  # (1, 2, 3) or (1, 3, 3) pixels
    return geometry.pixel_matrix_to_theta(matrix, height, width, transform).float()


def estimate_identity(reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """No alignment: the baseline every method must beat."""
    return geometry.identity_theta(1)


def estimate_ecc(
    reference: torch.Tensor, moving: torch.Tensor, levels: int = 3, motion: str = "affine"
) -> torch.Tensor:
    """OpenCV ECC (``MOTION_AFFINE`` or ``MOTION_HOMOGRAPHY``, ``levels``-level pyramid) from the identity."""
    result = refine_theta_ecc(reference, moving, None, levels=levels, motion=motion)
    if not bool(result.converged[0]):
        raise EstimationError("ECC did not converge")
    return result.theta


def estimate_features(
    reference: torch.Tensor, moving: torch.Tensor, detector: str = "sift", transform: str = "affine"
) -> torch.Tensor:
    """Keypoints (SIFT or ORB), ratio-tested matches, then RANSAC: ``cv2.estimateAffine2D`` for
    ``transform="affine"`` (θ ``(1, 2, 3)``), ``cv2.findHomography`` for ``"homography"`` (``(1, 3, 3)``).

    The transform is fitted from reference to moving keypoints, so it maps a reference pixel to the
    moving position that shows it: the pixel matrix of θ.
    """
    cv2 = import_cv2()
    if detector == "sift":
        extractor, norm = cv2.SIFT_create(), cv2.NORM_L2
    elif detector == "orb":
        extractor, norm = cv2.ORB_create(nfeatures=2000), cv2.NORM_HAMMING
    else:
        raise ValueError(f"expected detector 'sift' or 'orb', got {detector!r}")
    ref_points, ref_descriptors = extractor.detectAndCompute(_gray_uint8(reference), None)
    mov_points, mov_descriptors = extractor.detectAndCompute(_gray_uint8(moving), None)
    if ref_descriptors is None or mov_descriptors is None or len(ref_points) < 3 or len(mov_points) < 3:
        raise EstimationError(f"{detector}: too few keypoints")
    matches = cv2.BFMatcher(norm).knnMatch(ref_descriptors, mov_descriptors, k=2)
    good = [m[0] for m in matches if len(m) == 2 and m[0].distance < RATIO_TEST * m[1].distance]
    needed = MIN_MATCHES[transform]
    if len(good) < needed:
        raise EstimationError(f"{detector}: {len(good)} matches after the ratio test, need {needed}")
    source = np.float32([ref_points[m.queryIdx].pt for m in good])
    target = np.float32([mov_points[m.trainIdx].pt for m in good])
    if transform == "homography":
        matrix, _ = cv2.findHomography(source, target, cv2.RANSAC, RANSAC_THRESHOLD)
    else:
        matrix, _ = cv2.estimateAffine2D(source, target, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_THRESHOLD)
    if matrix is None:
        raise EstimationError(f"{detector}: RANSAC found no {transform}")
    return _matrix_to_theta(matrix, *reference.shape[-2:], transform)


def estimate_phase(reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """Hann-windowed phase correlation (``cv2.phaseCorrelate``): a translation only.

    ``phaseCorrelate(R, M)`` returns the shift ``d`` of ``M``'s content relative to ``R``'s
    (``M(x + d) = R(x)``), so a reference pixel ``x`` is shown at ``x + d`` in the moving image.
    """
    cv2 = import_cv2()
    ref, mov = _gray_float(reference), _gray_float(moving)
    window = cv2.createHanningWindow(ref.shape[::-1], cv2.CV_32F)
    (shift_x, shift_y), _ = cv2.phaseCorrelate(ref, mov, window)
    matrix = np.array([[1.0, 0.0, shift_x], [0.0, 1.0, shift_y]])
    return _matrix_to_theta(matrix, *reference.shape[-2:])


def estimate_kornia(
    reference: torch.Tensor, moving: torch.Tensor, num_iterations: int = KORNIA_ITERATIONS
) -> torch.Tensor:
    """kornia's ``ImageRegistrator`` (homography, gradient descent on a pyramid): θ ``(1, 3, 3)``.

    ``register(src, dst)`` returns the map from ``dst`` to ``src`` normalised coordinates
    (``align_corners=False``), our θ with ``src = moving`` and ``dst = reference``.
    """
    from kornia.geometry import ImageRegistrator

    registrator = ImageRegistrator(
        "homography", num_iterations=num_iterations, pyramid_levels=KORNIA_PYRAMID_LEVELS, lr=1e-3, tolerance=1e-5
    )
    with torch.enable_grad():
        homography = registrator.register(moving[None].float(), reference[None].float()).detach()  # (1, 3, 3)
    homography = homography / homography[:, 2:, 2:]
    if not torch.isfinite(homography).all():
        raise EstimationError("kornia: non-finite homography")
    return homography.float()


CLASSICAL_ESTIMATORS = {
    "identity": estimate_identity,
    "ecc": estimate_ecc,
    "sift": lambda r, m: estimate_features(r, m, "sift"),
    "orb": lambda r, m: estimate_features(r, m, "orb"),
    "phase": estimate_phase,
    "kornia": estimate_kornia,
    # Projective versions, for viewpoint changes (the `projective` warp preset).
    "ecc-homography": lambda r, m: estimate_ecc(r, m, motion="homography"),
    "sift-homography": lambda r, m: estimate_features(r, m, "sift", "homography"),
}
# Methods a run may ask for beyond DEFAULT_METHODS.
OPTIONAL_METHODS = ("ecc-homography", "sift-homography")


def method_unavailable(method: str) -> str | None:
    """Why ``method`` cannot run here (a missing optional dependency), or ``None``."""
    modules = {"ecc": "cv2", "sift": "cv2", "orb": "cv2", "phase": "cv2", "kornia": "kornia"}
    modules.update({name: "cv2" for name in OPTIONAL_METHODS})
    extras = {"cv2": OPENCV_INSTALL_HINT, "kornia": "pip install kornia"}
    module = "cv2" if method.endswith("+ecc") else modules.get(method)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return f"{module} is not installed ({extras[module]})"
    return None


# ---------------------------------------------------------------------------------------- scoring
@dataclass
class MethodResult:
    """Per-pair errors and timings of one method (seconds: see :data:`~stn_diffusers.metrics.TIME_PER_PAIR`)."""

    errors: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    seconds_with_encode: list[float] = field(default_factory=list)
    failures: int = 0
    note: str = ""

    def summary(self) -> dict:
        """:func:`~stn_diffusers.metrics.summarize_errors` of the errors, with ``seconds_per_pair``,
        ``failures`` and, where measured, ``seconds_per_pair_with_encode`` and ``note``."""
        summary = {
            **metrics.summarize_errors(self.errors),
            "seconds_per_pair": float(np.mean(self.seconds)) if self.seconds else None,
            "failures": int(self.failures),
        }
        if self.seconds_with_encode:
            summary["seconds_per_pair_with_encode"] = float(np.mean(self.seconds_with_encode))
        if self.note:
            summary["note"] = self.note
        return summary


def pair_error(theta: torch.Tensor, pair: Pair) -> float:
    """MACE in pixels of the estimate ``theta`` ``(1, 2, 3)`` or ``(1, 3, 3)`` on ``pair``."""
    height, width = pair.reference.shape[-2:]
    return float(geometry.corner_error(theta.double(), pair.theta[None].double(), height, width)[0])


def _timed(function, *args) -> tuple[torch.Tensor | None, float, str]:
    """``(theta or None, seconds, failure reason)``; expected failures of an estimator are caught."""
    cv2_error = _cv2_error()
    start = time.perf_counter()
    try:
        theta = function(*args)
        reason = ""
    except (EstimationError, cv2_error, np.linalg.LinAlgError, torch.linalg.LinAlgError) as error:
        theta, reason = None, str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    return theta, metrics.seconds_since(start, theta), reason


def _cv2_error() -> type:
    try:
        import cv2

        return cv2.error
    except ImportError:
        return EstimationError


def _score(result: MethodResult, theta: torch.Tensor | None, pair: Pair) -> None:
    if theta is None:
        result.failures += 1
        theta = geometry.identity_theta(1)
    result.errors.append(pair_error(theta, pair))


def evaluate_classical(method: str, pairs: list[Pair], time_budget: float | None = None) -> MethodResult:
    """Run one classical method on every pair. ``time_budget`` (seconds, whole run) applies to kornia:
    pairs past it are not run and the method is reported as skipped."""
    estimator = CLASSICAL_ESTIMATORS[method]
    result = MethodResult()
    elapsed = 0.0
    for pair in pairs:
        theta, seconds, reason = _timed(estimator, pair.reference, pair.moving)
        if reason:
            logger.debug("%s failed on %s: %s", method, pair.name, reason)
        result.seconds.append(seconds)
        _score(result, theta, pair)
        elapsed += seconds
        if time_budget is not None and elapsed > time_budget and len(result.errors) < len(pairs):
            raise TimeoutError(
                f"{method} needed {elapsed:.0f} s for {len(result.errors)} of {len(pairs)} pairs, "
                f"over its budget of {time_budget:.0f} s"
            )
    return result


@dataclass
class StnEstimate:
    """θ of one pair from an STN pipeline, timed as the benchmark times it (:func:`estimate_stn`).

    Args:
        theta (`torch.Tensor` of shape `(1, 2, 3)` or `(1, 3, 3)`): aligns the moving image onto the
            reference, float32 on the CPU.
        latents (`torch.Tensor` of shape `(2, C, h, w)`): the moving and the reference latents, in that order.
        seconds: estimation with the latents given (:data:`~stn_diffusers.metrics.TIME_PER_PAIR`).
        encode_seconds: the VAE encode of both images; ``seconds + encode_seconds`` is
            :data:`~stn_diffusers.metrics.TIME_PER_PAIR_WITH_ENCODE`.
    """

    theta: torch.Tensor
    latents: torch.Tensor
    seconds: float
    encode_seconds: float


# Inference mode, as the pipeline's own call: the timed estimate pays no autograd bookkeeping.
@torch.inference_mode()
def estimate_stn(pipe, reference: torch.Tensor, moving: torch.Tensor) -> StnEstimate:
    """Encode both images ``(3, H, W)`` in ``[0, 1]`` at ``pipe``'s working size (one batch), then
    predict θ from the latents; each step timed on its own."""
    height, width = pipe.working_size(tuple(reference.shape[-2:]))
    start = time.perf_counter()
    latents = pipe.encode_images([moving, reference], height, width)  # (2, C, h, w): moving, reference
    encode_seconds = metrics.seconds_since(start, latents)
    start = time.perf_counter()
    # As the pipeline's call does: the moving image's zero padding is not matched as content.
    moving_weights = pipe.content_weights([moving], tuple(latents.shape[-2:]))
    theta = pipe.predict_theta(latents[:1], latents[1:], moving_weights=moving_weights).cpu()
    return StnEstimate(theta, latents, metrics.seconds_since(start), encode_seconds)


def latent_floor_theta(
    moving: torch.Tensor, reference: torch.Tensor, theta_true: torch.Tensor, iterations: int = LATENT_FLOOR_ITERATIONS
) -> torch.Tensor:
    """The best θ the latents themselves support, found from the truth: an oracle, not an estimator.

    Minimises the mean squared difference between ``warp(moving, θ)`` and ``reference`` (latents
    ``(1, C, h, w)``, over the cells the warp covers) with L-BFGS started at ``theta_true``
    ``(1, 2, 3)`` or ``(1, 3, 3)``. Were latents of a warped image the warped latents, the answer
    would be the truth; how far it drifts is the floor of any aligner that looks only at latents.
    Returns θ of ``theta_true``'s shape, float32 on the CPU.
    """
    # Clones: the latents may be inference tensors (see estimate_stn), which autograd cannot record.
    moving, reference = moving.detach().float().cpu().clone(), reference.detach().float().cpu().clone()
    theta = theta_true.detach().double().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        warped = geometry.warp(moving.double(), theta, padding_mode="zeros")
        covered = geometry.valid_mask(theta.detach(), *moving.shape[-2:])  # (1, 1, h, w)
        loss = (((warped - reference.double()) ** 2) * covered).sum() / covered.sum().clamp_min(1.0)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return theta.detach().float()


@torch.no_grad()
def evaluate_stn(
    pipe, pairs: list[Pair], refine: bool = True, refine_kwargs: dict | None = None, floor: bool = False
) -> dict[str, MethodResult]:
    """The STN alone and, with ``refine``, followed by ECC from its θ; with ``floor``, the latent floor
    of the pipeline's VAE (:func:`latent_floor_theta`) on the same encodes.

    Returns ``{"stn": ..., "stn+ecc": ... (with refine), "latent-floor": ... (with floor)}``.
    ``seconds`` is estimation with the latents given; ``seconds_with_encode`` adds the VAE encode of both
    images (see :func:`estimate_stn`).
    """
    stn_result, ecc_result = MethodResult(), (MethodResult() if refine else None)
    floor_result = MethodResult(note="oracle: started at the true θ") if floor else None
    for pair in pairs:
        estimate = estimate_stn(pipe, pair.reference, pair.moving)
        theta, seconds, encode_seconds = estimate.theta, estimate.seconds, estimate.encode_seconds
        stn_result.seconds.append(seconds)
        stn_result.seconds_with_encode.append(seconds + encode_seconds)
        finite = bool(torch.isfinite(theta).all())
        _score(stn_result, theta if finite else None, pair)
        if floor_result is not None:
            start = time.perf_counter()
            best = latent_floor_theta(estimate.latents[:1], estimate.latents[1:], pair.theta[None])
            floor_result.seconds.append(time.perf_counter() - start)
            floor_result.errors.append(pair_error(best, pair))
        if ecc_result is None:
            continue
        start = time.perf_counter()
        # ECC refines in the STN's own motion model: a homography STN gets MOTION_HOMOGRAPHY.
        kwargs = {"motion": motion_of(theta), **(refine_kwargs or {})}
        refined = refine_theta_ecc(pair.reference, pair.moving, theta if finite else None, **kwargs)
        refine_seconds = time.perf_counter() - start
        ecc_result.seconds.append(seconds + refine_seconds)
        ecc_result.seconds_with_encode.append(seconds + encode_seconds + refine_seconds)
        if not bool(refined.converged[0]):
            ecc_result.failures += 1  # scored with the STN's θ, which the refinement kept
        ecc_result.errors.append(pair_error(refined.theta if finite else geometry.identity_theta(1), pair))
    results = {"stn": stn_result}
    if ecc_result is not None:
        results["stn+ecc"] = ecc_result
    if floor_result is not None:
        results["latent-floor"] = floor_result
    return results


def parse_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"identity,stn,ecc"`` → a validated list."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    known = (*DEFAULT_METHODS, *OPTIONAL_METHODS)
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ValueError(f"expected methods from {', '.join(known)}, got {', '.join(unknown) or 'none'}")
    return names


def evaluate(
    pipelines: dict[str, object],
    sources: list[torch.Tensor],
    *,
    names: list[str] | None = None,
    num_pairs: int = DEFAULT_NUM_PAIRS,
    resolution: int = 512,
    seed: int = 0,
    warp: str = "standard",
    photometric: str = "none",
    local_change: float = 0.0,
    methods: str | list[str] = DEFAULT_METHODS,
    kornia_budget: float | None = 600.0,
    single_thread: bool = True,
) -> dict:
    r"""Score every method on the same seeded pairs and return the report (the ``--json`` layout).

    Args:
        pipelines: ``{name: STNAlignmentPipeline}``; each gives the methods ``name`` and ``name+ecc``
            when the :data:`STN_METHODS` ``"stn"`` / ``"stn+ecc"`` are in ``methods``.
        sources: photos ``(3, H, W)`` in ``[0, 1]``; pairs cycle over them (see :func:`seeded_pairs`).
        names: a name per source, for logs.
        num_pairs, resolution, seed, warp, photometric: the pairs (identical across methods and runs);
            ``num_pairs >= 1``, ``photometric`` one of :data:`~stn_diffusers.data.PHOTOMETRIC_MODES`.
        local_change: the share of each moving image replaced by other content (an object that moved,
            an edit); with ``warp="none"``, zero-motion pairs whose only change is local.
        methods: which methods to run (``DEFAULT_METHODS``).
        kornia_budget: seconds kornia may take over all pairs before it is reported as skipped.
        single_thread: one thread for OpenCV and torch, so timings compare like with like.

    Returns:
        ``{"pairs", "resolution", "warp", "photometric", "local_change", "seed", "methods": {name: summary},
        "skipped": {name: reason}}``; a summary is :meth:`MethodResult.summary`.
    """
    # Zero pairs would run every method for nothing and leave no errors to summarise.
    if int(num_pairs) < 1:
        raise ValueError(f"expected num_pairs >= 1, got {num_pairs}")
    methods = parse_methods(methods)
    pairs = seeded_pairs(sources, num_pairs, resolution, warp, seed, photometric, names, local_change)
    threads = torch.get_num_threads()
    if single_thread:
        torch.set_num_threads(1)
        if method_unavailable("ecc") is None:
            import_cv2().setNumThreads(1)
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    try:
        for method in methods:
            if method in STN_METHODS:
                if method != next(m for m in methods if m in STN_METHODS):
                    continue  # measured together with the first of them, on the same encodes
                refine = "stn+ecc" in methods
                reason = method_unavailable("stn+ecc") if refine else None
                if reason:
                    skipped["stn+ecc"] = reason
                    refine = False
                for name, pipe in pipelines.items():
                    measured = evaluate_stn(pipe, pairs, refine=refine, floor="latent-floor" in methods)
                    labels = {"stn": name, "stn+ecc": f"{name}+ecc", "latent-floor": f"{name} latent floor"}
                    for key, result in measured.items():
                        if key in methods:
                            results[labels[key]] = result.summary()
                if not pipelines:
                    for key in STN_METHODS:
                        if key in methods:
                            skipped[key] = "no --pipeline given"
                continue
            reason = method_unavailable(method)
            if reason:
                skipped[method] = reason
                continue
            try:
                budget = kornia_budget if method == "kornia" else None
                result = evaluate_classical(method, pairs, budget)
            except TimeoutError as error:
                skipped[method] = str(error)
                continue
            if method == "kornia":
                result.note = f"homography, {KORNIA_ITERATIONS} iterations per level, {KORNIA_PYRAMID_LEVELS} levels"
            results[method] = result.summary()
    finally:
        torch.set_num_threads(threads)
    return {
        "pairs": len(pairs),
        "resolution": resolution,
        "warp": warp,
        "photometric": photometric,
        "local_change": local_change,
        "seed": seed,
        "methods": results,
        "skipped": skipped,
    }


def _local_change_note(report: dict) -> str:
    share = report.get("local_change", 0.0)
    return f", {share:.0%} of each moving image replaced by other content" if share else ""


def markdown_table(report: dict) -> str:
    """The report of :func:`evaluate` as a markdown table, one row per method, and a line per note and
    per skipped method."""
    header = ["method", *metrics.SUMMARY_HEADER, "failures", metrics.TIME_PER_PAIR, metrics.TIME_PER_PAIR_WITH_ENCODE]
    rows = [
        [
            name,
            *metrics.summary_cells(s),
            s["failures"],
            metrics.format_milliseconds(s["seconds_per_pair"]),
            metrics.format_milliseconds(s.get("seconds_per_pair_with_encode")),
        ]
        for name, s in report["methods"].items()
    ]
    lines = [
        f"{report['pairs']} pairs, {report['resolution']}×{report['resolution']}, warp `{report['warp']}`, "
        f"photometric `{report['photometric']}`{_local_change_note(report)}, seed {report.get('seed', 0)}. "
        "MACE in pixels.",
        "",
        metrics.markdown_table(header, rows),
    ]
    for name, s in report["methods"].items():
        if s.get("note"):
            lines.append(f"\n`{name}`: {s['note']}.")
    for name, reason in report.get("skipped", {}).items():
        lines.append(f"\nSkipped `{name}`: {reason}.")
    return "\n".join(lines)
