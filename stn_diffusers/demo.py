"""``stn-diffusers demo``: align bundled photo pairs and show the result.

Synthetic pairs: three bundled photos (scikit-image's astronaut, coffee and chelsea) each moved by a
seeded ``standard`` affine warp, so the true θ is known and the corner error can be measured.
A real pair: two views of the same aloe plant from OpenCV's sample data (a stereo pair: no ground
truth, so the table shows the mean absolute difference over the overlap before and after).

Times are measured as ``stn-diffusers evaluate`` measures them, so the demo's table and the
benchmark's compare (see :mod:`stn_diffusers.metrics`): :data:`~stn_diffusers.metrics.TIME_PER_PAIR`
is estimation with the latents given (the STN on both latents, ECC on the pixels, ``stn+ecc`` the two
in turn) and :data:`~stn_diffusers.metrics.TIME_PER_PAIR_WITH_ENCODE` adds the VAE encode of both
images. The aligned images come from the pipeline itself, given the latents already encoded.

Every pair is aligned and tabulated first; the files are written last, all or none
(:func:`write_results`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

from . import files, geometry, metrics
from .data import ASSETS, REAL_PAIR, bundled_photos, seeded_pairs
from .evaluation import estimate_stn, method_unavailable
from .images import load_image, tensor_to_pil, to_rgb_tensor
from .refine import OPENCV_INSTALL_HINT, refine_theta_ecc

DEMO_RESOLUTION = 512
DEMO_SEED = 0
TILE = 256
ALIGNED_FOLDER = "aligned"
GRID_FILE = "grid.png"
RESULTS_MARKDOWN = "results.md"
RESULTS_JSON = "results.json"


@dataclass
class DemoRow:
    """One aligned pair: corner errors in pixels (none without ground truth) and seconds per method.

    ``seconds`` is estimation with the latents given; ``seconds_with_encode`` adds the VAE encode of
    both images (methods that encode only: ``stn``, ``stn+ecc``).
    """

    name: str
    errors: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    seconds_with_encode: dict[str, float] = field(default_factory=dict)
    difference_before: float = 0.0
    difference_after: float = 0.0


def _overlap_difference(aligned: torch.Tensor, reference: torch.Tensor, theta: torch.Tensor) -> float:
    """Mean absolute difference over the pixels the warp covers, ``(3, H, W)`` inputs."""
    covered = geometry.valid_mask(theta, *reference.shape[-2:])[0].bool().expand_as(reference)
    return float((aligned - reference).abs()[covered].mean())


def _ecc_refiner():
    """``refine_theta_ecc`` when OpenCV is installed, else ``None``."""
    return refine_theta_ecc if method_unavailable("ecc") is None else None


@torch.no_grad()
def _align_pair(pipe, name, reference, moving, true_theta, refine_theta) -> tuple[DemoRow, torch.Tensor, torch.Tensor]:
    """Align ``moving`` onto ``reference`` (``(3, H, W)`` each), timed like ``stn-diffusers evaluate``."""
    height, width = reference.shape[-2:]
    row = DemoRow(name=name)
    estimate = estimate_stn(pipe, reference, moving)
    theta = estimate.theta  # (1, 2, 3)
    row.seconds["stn"] = estimate.seconds
    row.seconds_with_encode["stn"] = estimate.seconds + estimate.encode_seconds
    # The original moving image warped by θ at full resolution, as the pipeline's `warped_images`.
    aligned = geometry.warp(moving[None], theta, mode="bicubic")[0].clamp(0, 1)
    identity = geometry.identity_theta(1)
    if true_theta is not None:
        row.errors["identity"] = float(geometry.corner_error(identity, true_theta, height, width))
        row.errors["stn"] = float(geometry.corner_error(theta, true_theta, height, width))
    if refine_theta is not None:
        for method, init in (("ecc", identity), ("stn+ecc", theta)):
            start = time.perf_counter()
            result = refine_theta(reference, moving, init)
            refine_seconds = metrics.seconds_since(start)
            if method == "ecc":
                row.seconds[method] = refine_seconds
            else:  # the STN's θ, then ECC from it
                row.seconds[method] = row.seconds["stn"] + refine_seconds
                row.seconds_with_encode[method] = row.seconds_with_encode["stn"] + refine_seconds
            if true_theta is not None:
                row.errors[method] = float(geometry.corner_error(result.theta, true_theta, height, width))
    row.difference_before = float((moving - reference).abs().mean())
    row.difference_after = _overlap_difference(aligned, reference, theta)
    return row, aligned, theta


def _label(tile: PIL.Image.Image, text: str) -> PIL.Image.Image:
    draw = PIL.ImageDraw.Draw(tile)
    draw.rectangle([0, 0, 8 + 6 * len(text), 14], fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255))
    return tile


def _grid(rows: list[list[tuple[str, torch.Tensor]]]) -> PIL.Image.Image:
    columns = max(len(r) for r in rows)
    grid = PIL.Image.new("RGB", (columns * TILE, len(rows) * TILE), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, (label, image) in enumerate(row):
            tile = tensor_to_pil(image).resize((TILE, TILE), PIL.Image.BILINEAR)
            grid.paste(_label(tile, label), (c * TILE, r * TILE))
    return grid


def _format(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _summaries(rows: list[DemoRow], methods: list[str]) -> dict[str, dict]:
    """Per method over the pairs with ground truth: :func:`~stn_diffusers.metrics.summarize_errors`
    with ``seconds_per_pair`` and ``seconds_per_pair_with_encode`` (``None`` where not measured), the
    keys of ``stn-diffusers evaluate``'s report."""
    synthetic = [row for row in rows if row.errors]
    summaries = {}
    for method in methods:
        seconds = [row.seconds[method] for row in synthetic if method in row.seconds]
        with_encode = [row.seconds_with_encode[method] for row in synthetic if method in row.seconds_with_encode]
        summaries[method] = {
            **metrics.summarize_errors([row.errors[method] for row in synthetic]),
            "seconds_per_pair": sum(seconds) / len(seconds) if seconds else None,
            "seconds_per_pair_with_encode": sum(with_encode) / len(with_encode) if with_encode else None,
        }
    return summaries


def _markdown(rows: list[DemoRow], methods: list[str], summaries: dict[str, dict]) -> str:
    """One row per pair (corner errors, times, differences), then the summary over the synthetic pairs."""
    timed = [m for m in methods if m != "identity"]
    encoded = [m for m in timed if any(m in row.seconds_with_encode for row in rows)]  # the methods that encode
    header = [
        "pair",
        *(f"{m} corner error (px)" for m in methods),
        *(f"{m} {metrics.TIME_PER_PAIR}" for m in timed),
        *(f"{m} {metrics.TIME_PER_PAIR_WITH_ENCODE}" for m in encoded),
        "mean abs diff before",
        "after (stn)",
    ]
    table = [
        [
            row.name,
            *(_format(row.errors.get(m)) for m in methods),
            *(metrics.format_milliseconds(row.seconds.get(m)) for m in timed),
            *(metrics.format_milliseconds(row.seconds_with_encode.get(m)) for m in encoded),
            f"{row.difference_before:.4f}",
            f"{row.difference_after:.4f}",
        ]
        for row in rows
    ]
    summary_header = ["method", *metrics.SUMMARY_HEADER, metrics.TIME_PER_PAIR, metrics.TIME_PER_PAIR_WITH_ENCODE]
    summary = [
        [
            method,
            *metrics.summary_cells(s),
            metrics.format_milliseconds(s["seconds_per_pair"]),
            metrics.format_milliseconds(s["seconds_per_pair_with_encode"]),
        ]
        for method, s in summaries.items()
    ]
    synthetic = sum(1 for row in rows if row.errors)
    return (
        metrics.markdown_table(header, table)
        + f"\n\nOver the {synthetic} synthetic pairs (corner error in pixels):\n\n"
        + metrics.markdown_table(summary_header, summary)
        + "\n"
    )


def run_demo(output_dir: str | Path = "stn-diffusers-demo", pipe=None) -> dict:
    """Align the bundled pairs with ``pipe`` (default: the embedded pipeline) and write
    ``aligned/*.png``, ``grid.png``, ``results.md`` and ``results.json`` under ``output_dir``
    (checked first, written last, all or none). Returns what ``results.json`` holds."""
    from .default import load_default

    # 1. Check the output folder before anything is loaded or computed
    output_dir = Path(output_dir)
    files.check_output_folder(output_dir / ALIGNED_FOLDER, "output_dir")
    pipe = pipe if pipe is not None else load_default()
    refine_theta = _ecc_refiner()

    # 2. Align the synthetic pairs, then the real one
    photos, names = bundled_photos()
    pairs = seeded_pairs(photos, len(photos), DEMO_RESOLUTION, "standard", DEMO_SEED, names=names)
    rows, grid_rows, aligned_images = [], [], {}
    for pair in pairs:
        name = Path(pair.name).stem
        row, aligned, _ = _align_pair(pipe, name, pair.reference, pair.moving, pair.theta[None], refine_theta)
        rows.append(row)
        grid_rows.append(_grid_row(pair.reference, pair.moving, aligned))
        aligned_images[name] = tensor_to_pil(aligned)

    reference, moving = (to_rgb_tensor(load_image(ASSETS / name)) for name in REAL_PAIR)
    row, aligned, _ = _align_pair(pipe, "aloe (real pair)", reference, moving, None, refine_theta)
    rows.append(row)
    grid_rows.append(_grid_row(reference, moving, aligned))
    aligned_images["aloe"] = tensor_to_pil(aligned)

    # 3. Tabulate
    methods = ["identity", "stn"] + (["ecc", "stn+ecc"] if refine_theta is not None else [])
    summaries = _summaries(rows, methods)
    table = _markdown(rows, methods, summaries)
    if refine_theta is None:
        table += f"\nOpenCV is not installed: `{OPENCV_INSTALL_HINT}` adds the ECC columns.\n"
    summary = {"rows": [row.__dict__ for row in rows], "methods": methods, "summary": summaries}

    # 4. Write every file at once
    write_results(output_dir, aligned_images, _grid(grid_rows), table, summary)
    return summary


def write_results(
    output_dir: str | Path, aligned: dict[str, PIL.Image.Image], grid: PIL.Image.Image, table: str, summary: dict
) -> None:
    """Write ``aligned/<name>.png`` for each of ``aligned`` (``{name: image}``), ``grid.png``,
    ``results.md`` (``table``) and ``results.json`` (``summary``) under ``output_dir``, all or none
    (:func:`stn_diffusers.files.write_outputs`); the folders must exist."""
    output_dir = Path(output_dir)
    pictures = {output_dir / ALIGNED_FOLDER / f"{name}.png": image for name, image in aligned.items()}
    pictures[output_dir / GRID_FILE] = grid
    writers = {path: files.image_writer(picture, path) for path, picture in pictures.items()}
    writers[output_dir / RESULTS_MARKDOWN] = files.text_writer(table)
    writers[output_dir / RESULTS_JSON] = files.text_writer(json.dumps(summary, indent=2))
    files.write_outputs(writers)


def _grid_row(reference: torch.Tensor, moving: torch.Tensor, aligned: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """reference | moving | aligned | |moving - reference| | |aligned - reference| (differences ×3)."""
    moving_resized = moving if moving.shape == reference.shape else torch.nn.functional.interpolate(
        moving[None], size=reference.shape[-2:], mode="bilinear", antialias=True
    )[0]
    return [
        ("reference", reference),
        ("moving", moving),
        ("aligned", aligned),
        ("|moving - ref|", ((moving_resized - reference).abs() * 3).clamp(0, 1)),
        ("|aligned - ref|", ((aligned - reference).abs() * 3).clamp(0, 1)),
    ]
