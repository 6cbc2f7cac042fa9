"""``stn-diffusers demo``: align bundled photo pairs and show the result.

Synthetic pairs: three bundled photos (scikit-image's astronaut, coffee and chelsea) each moved by a
seeded ``standard`` affine warp, so the true θ is known and the corner error can be measured.
A real pair: two views of the same aloe plant from OpenCV's sample data (a stereo pair: no ground
truth, so the table shows the mean absolute difference over the overlap before and after).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

from . import geometry
from .data import seeded_pairs
from .images import load_image, tensor_to_pil, to_rgb_tensor

ASSETS = Path(__file__).resolve().parent / "assets"
SYNTHETIC_PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg")
REAL_PAIR = ("aloeL.jpg", "aloeR.jpg")  # (reference, moving)
DEMO_RESOLUTION = 512
DEMO_SEED = 0
TILE = 256


@dataclass
class DemoRow:
    """One aligned pair: corner errors in pixels (``None`` without ground truth) and seconds."""

    name: str
    errors: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    difference_before: float = 0.0
    difference_after: float = 0.0


def _overlap_difference(aligned: torch.Tensor, reference: torch.Tensor, theta: torch.Tensor) -> float:
    """Mean absolute difference over the pixels the warp covers, ``(3, H, W)`` inputs."""
    covered = geometry.valid_mask(theta, *reference.shape[-2:])[0].bool().expand_as(reference)
    return float((aligned - reference).abs()[covered].mean())


def _ecc_refiner():
    """``refine_theta_ecc`` when OpenCV is installed, else ``None``."""
    from .refine import import_cv2, refine_theta_ecc

    try:
        import_cv2()
    except ImportError:
        return None
    return refine_theta_ecc


def _time(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def _align_pair(pipe, name, reference, moving, true_theta, refine_theta) -> tuple[DemoRow, torch.Tensor, torch.Tensor]:
    height, width = reference.shape[-2:]
    row = DemoRow(name=name)
    output, row.seconds["stn"] = _time(pipe, tensor_to_pil(moving), reference=tensor_to_pil(reference), output_type="pt")
    theta = output.theta
    aligned = output.warped_images[0]
    identity = geometry.identity_theta(1)
    if true_theta is not None:
        row.errors["identity"] = float(geometry.corner_error(identity, true_theta, height, width))
        row.errors["stn"] = float(geometry.corner_error(theta, true_theta, height, width))
    if refine_theta is not None:
        for method, init in (("ecc", identity), ("stn+ecc", theta)):
            result, seconds = _time(refine_theta, reference, moving, init)
            row.seconds[method] = seconds + (row.seconds["stn"] if method == "stn+ecc" else 0.0)
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


def _format(value: float | None, unit: str = "") -> str:
    return "—" if value is None else f"{value:.2f}{unit}"


def _markdown(rows: list[DemoRow], methods: list[str]) -> str:
    header = ["pair"] + [f"{m} corner error (px)" for m in methods] + [f"{m} time (ms)" for m in methods if m != "identity"]
    # The STN's time is the whole pipeline call (encode both images, align, decode); ECC's is estimation only.
    header += ["mean abs diff before", "after (stn)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.name] + [_format(row.errors.get(m)) for m in methods]
        cells += [_format(row.seconds.get(m, 0.0) * 1000) for m in methods if m != "identity"]
        cells += [f"{row.difference_before:.4f}", f"{row.difference_after:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(output_dir: str | Path = "stn-diffusers-demo", pipe=None) -> dict:
    """Align the bundled pairs with ``pipe`` (default: the embedded pipeline) and write
    ``aligned/*.png``, ``grid.png``, ``results.md`` and ``results.json`` under ``output_dir``."""
    from .default import load_default

    pipe = pipe if pipe is not None else load_default()
    output_dir = Path(output_dir)
    (output_dir / "aligned").mkdir(parents=True, exist_ok=True)
    refine_theta = _ecc_refiner()
    photos = [to_rgb_tensor(load_image(ASSETS / name)) for name in SYNTHETIC_PHOTOS]
    pairs = seeded_pairs(photos, len(photos), DEMO_RESOLUTION, "standard", DEMO_SEED, names=list(SYNTHETIC_PHOTOS))

    rows, grid_rows = [], []
    for pair in pairs:
        name = Path(pair.name).stem
        row, aligned, _ = _align_pair(pipe, name, pair.reference, pair.moving, pair.theta[None], refine_theta)
        rows.append(row)
        grid_rows.append(_grid_row(pair.reference, pair.moving, aligned))
        tensor_to_pil(aligned).save(output_dir / "aligned" / f"{name}.png")

    reference = to_rgb_tensor(load_image(ASSETS / REAL_PAIR[0]))
    moving = to_rgb_tensor(load_image(ASSETS / REAL_PAIR[1]))
    row, aligned, _ = _align_pair(pipe, "aloe (real pair)", reference, moving, None, refine_theta)
    rows.append(row)
    grid_rows.append(_grid_row(reference, moving, aligned))
    tensor_to_pil(aligned).save(output_dir / "aligned" / "aloe.png")

    methods = ["identity", "stn"] + (["ecc", "stn+ecc"] if refine_theta is not None else [])
    table = _markdown(rows, methods)
    if refine_theta is None:
        table += "\nOpenCV is not installed: `pip install \"stn-diffusers[opencv]\"` adds the ECC columns.\n"
    _grid(grid_rows).save(output_dir / "grid.png")
    (output_dir / "results.md").write_text(table)
    summary = {"rows": [row.__dict__ for row in rows], "methods": methods}
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


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
