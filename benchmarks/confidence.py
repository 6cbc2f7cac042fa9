"""Calibrating the alignment confidence (:mod:`stn_diffusers.confidence`) on held-out photos.

    taskset -c 0 python benchmarks/confidence.py                         # fit on one half, report on the other
    taskset -c 0 python benchmarks/confidence.py --fit-only              # the fitting half alone: the constants
    python benchmarks/confidence.py --photos DIR --png data/confidence_curve.png

The photos (sorted by path) are split in two halves, even and odd positions: the logistic model is
fitted on the pairs of the even half, and every rate is reported on the odd half, whose photos the
fit never saw. Each half gets the same kinds of cases, from seeded pairs
(:func:`stn_diffusers.data.seeded_pairs`, 512 × 512) in six settings: ``standard`` and ``large``
warps, ``standard`` with a realistic photometric change, ``standard`` with 20 % of the moving image
replaced by other content, ``projective`` warps (θ ``(3, 3)``), and zero motion with both a
photometric and a local change; the pairs with a local change are judged twice, without and with
the changed region as ``ignore_mask``. For each pair the candidate θ are:

* good (corner error < 2 px): the true θ, and the true θ perturbed by 0.2–1.9 px;
* failed (> 5 px): the true θ perturbed by 5–100 px (log-uniform) and by 5–12 px (near misses), a
  random θ (``geometry.random_theta``, ``standard`` range), the identity (no alignment at all), and
  the embedded default STN's own estimate on the first ``--stn-pairs`` pairs of each setting with a
  ``standard`` or ``large`` warp, run at a 256 px working size (a quarter of the encode cost), wherever
  it fails;
* unrelated: the reference of each pair of the ``standard`` and ``large`` settings with the moving
  image of the next pair from another photo, aligned by the identity, by the other pair's true θ and
  (first ``--stn-pairs``) by the STN's estimate.

Estimates between 2 and 5 px are neither good nor failed: they are counted in the calibration table
only. The model is fitted by penalised logistic regression (good = 1; failed and unrelated = 0). The
rates use the constants written in ``stn_diffusers/confidence.py``; the constants this run fits are
printed beside them, to be copied there by hand, with the threshold curve of the fitting half to
choose the default threshold from. A last table checks the ECC acceptance rule: ECC
(``refine_theta_ecc``) started from the STN's θ, accepted by its own rule and by that rule plus the
confidence of the refined θ.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stn_diffusers import confidence, data, geometry, metrics

DEFAULT_PHOTOS = "data/photos/heldout"
RESOLUTION = 512
# The STN's working size for its estimates: a quarter of the encode cost of 512.
STN_SIZE = 256
# Settings of the seeded pairs: (warp, photometric, local_change).
SETTINGS = (
    ("standard", "none", 0.0),
    ("large", "none", 0.0),
    ("standard", "realistic", 0.0),
    ("standard", "none", 0.2),
    ("projective", "none", 0.0),
    ("none", "realistic", 0.2),
)
# Warps whose pairs also get the STN's estimate.
STN_WARPS = ("standard", "large")
GOOD_ERROR, FAILED_ERROR = 2.0, 5.0  # pixels at RESOLUTION
SMALL_PERTURBATION = (0.2, 1.9)
WIDE_PERTURBATION = (5.0, 100.0)  # drawn log-uniform
NEAR_PERTURBATION = (5.0, 12.0)
# The targets at the default threshold: errors > 5 px flagged, false alarms (< 2 px), unrelated flagged.
TARGETS = {"failed": ("≥", 0.90), "good": ("≤", 0.05), "unrelated": ("≥", 0.95)}
# The data are nearly separable: without a penalty the weights grow without bound and the confidence
# becomes a step. The penalty keeps it a graded probability.
L2_PENALTY = 1.0
NEWTON_STEPS = 100
CURVE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CALIBRATION_BINS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
# alignment_confidence is timed on this many pairs.
TIMED_PAIRS = 8


@dataclass
class Case:
    """One (pair, θ) measured: ``error`` in pixels at :data:`RESOLUTION` (``inf`` for an unrelated pair)."""

    setting: str
    kind: str
    error: float
    correlation: float
    residual: float

    @property
    def label(self) -> str:
        """``"unrelated"``, ``"failed"`` (> 5 px), ``"good"`` (< 2 px) or ``"between"``."""
        if math.isinf(self.error):
            return "unrelated"
        if self.error > FAILED_ERROR:
            return "failed"
        return "good" if self.error < GOOD_ERROR else "between"


@dataclass
class Half:
    """The cases of one half of the photos, their confidences under the shipped constants, and
    ``(pair, STN θ)`` of the pairs the STN aligned (for the ECC check)."""

    cases: list[Case]
    scores: np.ndarray
    stn_estimates: list[tuple[data.Pair, torch.Tensor]]


# ------------------------------------------------------------------------------------------ cases
def uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def pair_error(theta: torch.Tensor, pair: data.Pair) -> float:
    """Mean corner error in pixels of ``theta`` ``(1, 2|3, 3)`` on ``pair``."""
    return geometry.corner_error(theta.double(), pair.theta[None].double(), RESOLUTION, RESOLUTION).item()


def perturb(theta: torch.Tensor, error: float, generator: torch.Generator) -> torch.Tensor:
    """θ ``(1, 2, 3)`` or ``(1, 3, 3)`` moved in a random direction of its first two rows by about
    ``error`` pixels of mean corner error at :data:`RESOLUTION` (exactly, for an affine θ)."""
    direction = torch.zeros_like(theta, dtype=torch.float64)
    direction[:, :2] = torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)
    base = theta.double()
    unit = geometry.corner_error(base + direction, base, RESOLUTION, RESOLUTION).item()
    return (base + direction * (error / unit)).float()


def stn_theta(pipe, reference: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
    """The STN's θ ``(1, 2, 3)`` for one pair, encoded at :data:`STN_SIZE`."""
    latents = pipe.encode_images([moving, reference], STN_SIZE, STN_SIZE)  # (2, C, h, w): moving, reference
    return pipe.predict_theta(latents[:1], latents[1:]).float().cpu()


def measure(
    setting: str,
    kind: str,
    reference: torch.Tensor,
    pair: data.Pair,
    theta: torch.Tensor,
    related: bool = True,
    ignore_mask: torch.Tensor | None = None,
) -> Case:
    """The case of ``theta`` aligning ``pair.moving`` onto ``reference`` (the pair's own, when ``related``)."""
    evidence = confidence.alignment_evidence(reference, pair.moving, theta, ignore_mask)
    error = pair_error(theta, pair) if related else math.inf
    return Case(setting, kind, error, float(evidence.correlation[0]), float(evidence.residual[0]))


def setting_name(warp: str, photometric: str, local_change: float) -> str:
    name = warp + (f", {photometric}" if photometric != "none" else "")
    return name + (f", {local_change:.0%} changed" if local_change else "")


def candidates(pair: data.Pair, generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    """The perturbed, random and identity θ of one pair (see the module docs), in the true θ's shape."""
    truth = pair.theta[None]
    wide = math.exp(uniform(*(math.log(e) for e in WIDE_PERTURBATION), generator))
    random_theta = geometry.random_theta(1, "standard", RESOLUTION, RESOLUTION, generator)
    identity = geometry.identity_theta(1)
    if geometry.is_homography(truth):
        random_theta, identity = geometry.to_homogeneous(random_theta), geometry.to_homogeneous(identity)
    thetas = [
        ("true θ", truth),
        ("true θ + 0.2–1.9 px", perturb(truth, uniform(*SMALL_PERTURBATION, generator), generator)),
        ("true θ + 5–100 px", perturb(truth, wide, generator)),
        ("true θ + 5–12 px", perturb(truth, uniform(*NEAR_PERTURBATION, generator), generator)),
        ("random θ", random_theta),
    ]
    if pair_error(identity, pair) > 0:  # with no motion the identity is the true θ
        thetas.append(("identity", identity))
    return thetas


@torch.no_grad()
def build_half(sources, names, pairs_per_setting: int, seed: int, pipe, stn_pairs: int) -> tuple[list, list]:
    """Every case of one half of the photos, and ``(pair, STN θ)`` of the pairs the STN aligned."""
    generator = torch.Generator().manual_seed(seed)
    cases, pairs, stn_estimates = [], [], []
    for index, (warp, photometric, local_change) in enumerate(SETTINGS):
        setting = setting_name(warp, photometric, local_change)
        batch = data.seeded_pairs(
            sources, pairs_per_setting, RESOLUTION, warp, seed + index, photometric, names, local_change
        )
        for number, pair in enumerate(batch):
            thetas = candidates(pair, generator)
            if warp in STN_WARPS and number < stn_pairs:
                estimate = stn_theta(pipe, pair.reference, pair.moving)
                thetas.append(("STN", estimate))
                stn_estimates.append((pair, estimate))
            cases += [measure(setting, kind, pair.reference, pair, theta) for kind, theta in thetas]
            if pair.changed is not None:  # the same θ judged again with the changed region ignored
                ignored = geometry.warp(pair.changed[None], pair.theta[None])[0]  # (1, S, S), reference frame
                masked = f"{setting}, ignore mask"
                cases += [
                    measure(masked, kind, pair.reference, pair, theta, ignore_mask=ignored) for kind, theta in thetas
                ]
            pairs.append(pair)
    # Unrelated: the reference of a pair of the first two settings with the moving image of the next
    # pair from another photo.
    for number, pair in enumerate(pairs[: 2 * pairs_per_setting]):
        other = next(p for p in pairs[number + 1 :] + pairs if p.name != pair.name)
        thetas = [("identity", geometry.identity_theta(1)), ("true θ of the moving image's pair", other.theta[None])]
        if number < stn_pairs:
            thetas.append(("STN", stn_theta(pipe, pair.reference, other.moving)))
        cases += [measure("unrelated", kind, pair.reference, other, theta, related=False) for kind, theta in thetas]
    return cases, stn_estimates


# ------------------------------------------------------------------------------------ the model
def features(cases: list[Case]) -> np.ndarray:
    """``(N, 3)``: 1 (the intercept), the residual in units of ERROR_FRACTION, the correlation."""
    return np.array([[1.0, c.residual / confidence.ERROR_FRACTION, c.correlation] for c in cases])


def fit_logistic(cases: list[Case]) -> np.ndarray:
    """``(intercept, residual weight, correlation weight)`` of the penalised logistic model of
    P(good) on the good (1), failed and unrelated (0) cases, by Newton's method."""
    kept = [c for c in cases if c.label != "between"]
    inputs, target = features(kept), np.array([c.label == "good" for c in kept], dtype=float)
    penalty = L2_PENALTY * np.diag([0.0, 1.0, 1.0])  # the intercept is not penalised
    weights = np.zeros(3)
    for _ in range(NEWTON_STEPS):
        probability = 1 / (1 + np.exp(-inputs @ weights))
        gradient = inputs.T @ (probability - target) + penalty @ weights
        hessian = (inputs * (probability * (1 - probability))[:, None]).T @ inputs + penalty
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-10:
            break
    return weights


def confidences(cases: list[Case], weights) -> np.ndarray:
    """``(N,)`` the model's confidence of each case (the formula of confidence.confidence_from_evidence)."""
    return 1 / (1 + np.exp(-features(cases) @ np.asarray(weights)))


# ------------------------------------------------------------------------------------- tables
def flagged(half: Half, threshold: float, label: str, **where) -> tuple[int, float]:
    """``(count, share flagged)`` of the cases of ``half`` with ``label`` (and the given ``setting``/``kind``)."""
    chosen = [
        i
        for i, case in enumerate(half.cases)
        if case.label == label and all(getattr(case, key) == value for key, value in where.items())
    ]
    if not chosen:
        return 0, float("nan")
    return len(chosen), float((half.scores[chosen] < threshold).mean())


def percent(rate: float) -> str:
    return "—" if math.isnan(rate) else f"{rate:.1%}"


def rate_rows(fit: Half, report: Half, threshold: float) -> list[list]:
    """Each group of cases: its count and share flagged in both halves, and its target."""
    titles = {"failed": "errors > 5 px", "good": "false alarms: errors < 2 px", "unrelated": "unrelated pairs"}
    rows = []
    for label, title in titles.items():
        key = "setting" if label == "good" else "kind"
        groups = dict.fromkeys(getattr(c, key) for c in report.cases if c.label == label)
        sign, target = TARGETS[label]
        for name, where in [(f"{title}, all", {}), *((f"  {group}", {key: group}) for group in groups)]:
            cells = [cell for half in (fit, report) for cell in flagged(half, threshold, label, **where)]
            goal = "" if where else f"{sign} {target:.0%}"
            rows.append([name, cells[0], percent(cells[1]), cells[2], percent(cells[3]), goal])
    return rows


def curve_rows(fit: Half, report: Half) -> list[list]:
    rows = []
    for threshold in CURVE_THRESHOLDS:
        rates = [flagged(half, threshold, label)[1] for half in (fit, report) for label in TARGETS]
        rows.append([f"{threshold:.2f}", *(percent(rate) for rate in rates)])
    return rows


def calibration_rows(half: Half) -> list[list]:
    """Per confidence bin: cases, mean confidence, and the share whose error is at most 5 px."""
    right = np.array([case.error <= FAILED_ERROR for case in half.cases])
    rows = []
    for low, high in zip(CALIBRATION_BINS[:-1], CALIBRATION_BINS[1:]):
        inside = (half.scores >= low) & ((half.scores < high) if high < 1 else (half.scores <= high))
        mean = f"{half.scores[inside].mean():.2f}" if inside.any() else "—"
        share = right[inside].mean() if inside.any() else math.nan
        rows.append([f"{low:.1f}–{high:.1f}", int(inside.sum()), mean, percent(share)])
    return rows


def ecc_rows(stn_estimates: list, threshold: float) -> list[list]:
    """ECC from the STN's θ on related pairs and on unrelated ones (the reference of a pair from another
    photo): the share refine_theta_ecc accepts, the share it accepts with the refined θ's confidence at
    least ``threshold``, how many of its accepted results the confidence turns down that were right
    (< 2 px) and wrong (> 5 px), and the error (median / mean) of the θ each rule keeps."""
    from stn_diffusers.refine import refine_theta_ecc

    rows = []
    for title, related in (("related", True), ("unrelated", False)):
        accepted = confident = turned_down_right = turned_down_wrong = 0
        errors_accepted, errors_confident = [], []
        for number, (pair, estimate) in enumerate(stn_estimates):
            reference = pair.reference
            if not related:
                others = stn_estimates[number + 1 :] + stn_estimates
                reference = next(p for p, _ in others if p.name != pair.name).reference
            result = refine_theta_ecc(reference, pair.moving, estimate)
            converged = bool(result.converged[0])
            sure = float(confidence.alignment_confidence(reference, pair.moving, result.theta)[0]) >= threshold
            accepted += converged
            confident += converged and sure
            error = pair_error(result.theta, pair) if related else math.inf
            turned_down_right += converged and not sure and error < GOOD_ERROR
            turned_down_wrong += converged and not sure and error > FAILED_ERROR
            if related:
                errors_accepted.append(error)
                errors_confident.append(error if converged and sure else pair_error(estimate, pair))
        count = len(stn_estimates)
        errors = [f"{np.median(e):.2f} / {np.mean(e):.2f}" if e else "—" for e in (errors_accepted, errors_confident)]
        shares = [f"{accepted / count:.0%}", f"{confident / count:.0%}"]
        rows.append([title, count, *shares, turned_down_right, turned_down_wrong, *errors])
    return rows


def save_curve(path: Path, report: Half, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"failed": "errors > 5 px flagged", "good": "false alarms (< 2 px)", "unrelated": "unrelated flagged"}
    thresholds = np.linspace(0.0, 1.0, 101)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for label, title in titles.items():
        axis.plot(thresholds, [flagged(report, t, label)[1] for t in thresholds], label=title)
    axis.axvline(threshold, color="gray", linestyle="--", label=f"default {threshold:.2f}")
    axis.set_xlabel("confidence threshold")
    axis.set_ylabel("share flagged (report half)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=DEFAULT_PHOTOS, help="folder of photos, split in two halves")
    parser.add_argument("--pairs-per-setting", type=int, default=48, help="seeded pairs per setting and half")
    parser.add_argument("--stn-pairs", type=int, default=16, help="pairs per STN warp (and unrelated) the STN aligns")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs and perturbations")
    parser.add_argument("--fit-only", action="store_true", help="measure the fitting half only: the constants")
    parser.add_argument("--png", default=None, help="also draw the report half's curve to this PNG")
    return parser.parse_args()


def print_table(title: str, header, rows) -> None:
    print(f"\n{title}\n")
    print(metrics.markdown_table(header, rows))


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    torch.set_num_threads(1)
    from stn_diffusers import load_default
    from stn_diffusers.refine import import_cv2

    import_cv2().setNumThreads(1)
    pipe = load_default()
    pipe.set_progress_bar_config(disable=True)
    sources, paths = data.load_photo_folder(args.photos)
    names = [path.stem for path in paths]
    shipped = (confidence.CONFIDENCE_INTERCEPT, confidence.RESIDUAL_WEIGHT, confidence.CORRELATION_WEIGHT)
    threshold = confidence.DEFAULT_CONFIDENCE_THRESHOLD
    print(
        f"{len(sources)} photos in {args.photos}: fit on the {len(sources[0::2])} at even positions, report on the "
        f"{len(sources[1::2])} at odd positions; {RESOLUTION}×{RESOLUTION} pairs, seed {args.seed}"
    )

    fit_cases, _ = build_half(sources[0::2], names[0::2], args.pairs_per_setting, args.seed, pipe, args.stn_pairs)
    fitted = fit_logistic(fit_cases)
    print(
        f"Fitted on the fitting half ({len(fit_cases)} cases): CONFIDENCE_INTERCEPT = {fitted[0]:.2f}, "
        f"RESIDUAL_WEIGHT = {fitted[1]:.2f}, CORRELATION_WEIGHT = {fitted[2]:.2f}"
    )
    print(
        f"Shipped (stn_diffusers/confidence.py): {shipped[0]:.2f}, {shipped[1]:.2f}, {shipped[2]:.2f}; "
        f"threshold {threshold:.2f}"
    )
    # With --fit-only the curve is the one the fitted constants give: the default threshold is chosen on it.
    fit = Half(fit_cases, confidences(fit_cases, fitted if args.fit_only else shipped), [])
    report = Half([], np.zeros(0), [])
    if not args.fit_only:
        report_cases, stn_estimates = build_half(
            sources[1::2], names[1::2], args.pairs_per_setting, args.seed + 1, pipe, args.stn_pairs
        )
        report = Half(report_cases, confidences(report_cases, shipped), stn_estimates)

    columns = ("> 5 px", "< 2 px", "unrelated")
    header = ("threshold", *(f"{half}: {column}" for half in ("fit", "report") for column in columns))
    constants = "the constants fitted now" if args.fit_only else "shipped constants"
    print_table(f"Threshold against the share flagged ({constants}):", header, curve_rows(fit, report))
    if args.fit_only:
        print(f"\nwhole run {time.perf_counter() - start:.0f} s")
        return
    header = ("cases", "fit half: n", "flagged", "report half: n", "flagged", "target")
    title = f"Share flagged at the default threshold (confidence < {threshold:.2f}):"
    print_table(title, header, rate_rows(fit, report, threshold))
    header = ("confidence", "cases", "mean confidence", "error ≤ 5 px")
    print_table("Report half, calibration (unrelated pairs count as errors > 5 px):", header, calibration_rows(report))
    header = (
        "pairs", "n", "ECC accepted", "accepted and confident", "turned down: < 2 px", "turned down: > 5 px",
        "MACE, ECC's rule", "MACE, with confidence",
    )  # fmt: skip
    title = (
        f"ECC from the STN's θ on the report half, accepted by refine_theta_ecc and by it with the refined θ's "
        f"confidence ≥ {threshold:.2f}; MACE (median / mean, px) of the θ each rule keeps:"
    )
    print_table(title, header, ecc_rows(report.stn_estimates, threshold))
    seconds = []
    for pair, estimate in report.stn_estimates[:TIMED_PAIRS]:
        tick = time.perf_counter()
        confidence.alignment_confidence(pair.reference, pair.moving, estimate)
        seconds.append(time.perf_counter() - tick)
    median = metrics.format_milliseconds(float(np.median(seconds)))
    print(
        f"\nalignment_confidence per {RESOLUTION}×{RESOLUTION} pair: {median} (median of {len(seconds)}, one thread); "
        f"whole run {time.perf_counter() - start:.0f} s"
    )
    if args.png:
        save_curve(Path(args.png), report, threshold)


if __name__ == "__main__":
    main()
