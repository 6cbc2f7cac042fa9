"""``stn-diffusers analyze``: the instruments that show whether a spatial transformer works.

For any :class:`STNAlignmentPipeline` this measures, on seeded synthetic pairs from real photos:

* **architecture**: each leaf layer's output shape for the configured latent size, and parameters;
* **identity check**: θ predicted for zero-misalignment pairs (reference against itself), the share
  that is identity within :data:`IDENTITY_TOLERANCE`, and how much the latents move;
* **gradient flow**: per-parameter gradient norms of the fine-tuning loss for one batch, so a dead
  localisation net (only the last layer learning) shows at a glance;
* **θ statistics**: predicted against true θ per entry, and the corner-error distribution
  (:func:`stn_diffusers.metrics.summarize_errors`, the statistics every report of the project uses);
* **visual grid**: reference | moving | aligned (pixel warp) | aligned (decoded) | differences, and
  the latent channels before and after;
* **training curves**: loss and validation corner error against step, when the pipeline folder
  holds the ``metrics.jsonl`` that fine-tuning writes.

:func:`analyze` computes every measurement and figure first, then writes ``report.json``,
``report.md`` and the PNG figures all or none (:func:`stn_diffusers.files.write_outputs`), and
returns the report. θ follows the convention in :mod:`stn_diffusers.geometry`.

    stn-diffusers analyze --pipeline my-aligner --data photos/heldout --output report
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import files, geometry, metrics
from .data import Pair, bundled_photos, seeded_pairs

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn, so the CLI starts fast
    from matplotlib.figure import Figure

# A θ entry within this of the identity's counts as identity (the seed report's criterion).
IDENTITY_TOLERANCE = 1e-3
DEFAULT_NUM_PAIRS = 32
DEFAULT_NUM_VISUAL = 3
# Pairs encoded and aligned at once, and the size of the gradient-flow batch.
BATCH_SIZE = 8
METRICS_FILE = "metrics.jsonl"
REPORT_JSON = "report.json"
REPORT_MARKDOWN = "report.md"
FIGURE_DPI = 100
THETA_ENTRIES = [f"θ[{row},{column}]" for row in range(2) for column in range(3)]
FIGURES = {
    "gradient_flow": "gradient_flow.png",
    "theta_scatter": "theta_scatter.png",
    "corner_error": "corner_error_hist.png",
    "grid": "grid.png",
    "latents": "latents.png",
    "training_curves": "training_curves.png",
}


# ------------------------------------------------------------------------------------------ inputs
def analysis_resolution(pipe) -> int:
    """Pixel side of the square pairs: the STN's configured latent size times the VAE factor."""
    return pipe.stn.config.sample_size * pipe.vae_scale_factor


# ------------------------------------------------------------------------------------ architecture
def _dummy_latents(stn, sample_size: int | None) -> torch.Tensor:
    size = sample_size or stn.config.sample_size
    parameter = next(stn.parameters())
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, stn.config.in_channels, size, size, generator=generator)
    return sample.to(device=parameter.device, dtype=parameter.dtype)


@torch.no_grad()
def layer_table(stn, sample_size: int | None = None) -> dict:
    """Each leaf layer's output shape(s) for one ``(1, C, S, S)`` latent, and parameter counts.

    ``S`` is ``stn.config.sample_size`` unless given. Layers called more than once (the correlation
    design's pyramid, once per cascade iteration) list every distinct shape in call order.
    ``activation_shapes`` follows the localisation net (``stn.localization``), keeping each shape
    change once: for the seed design at 4×64×64, 32×58×58 → 32×29×29 → 64×25×25 → 64×12×12.

    Returns ``{"input_shape", "layers": [{"name", "type", "output_shapes", "parameters"}],
    "other_parameters", "activation_shapes", "total_parameters", "trainable_parameters"}``.
    """
    sample = _dummy_latents(stn, sample_size)
    shapes: dict[str, list[list[int]]] = {}
    calls: list[tuple[str, list[int]]] = []

    def record(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                shape = list(output.shape[1:])  # drop the batch dimension
                calls.append((name, shape))
                if shape not in shapes.setdefault(name, []):
                    shapes[name].append(shape)

        return hook

    leaves = [(name, module) for name, module in stn.named_modules() if name and not list(module.children())]
    handles = [module.register_forward_hook(record(name)) for name, module in leaves]
    try:
        # One latent, no pipeline: the STN's own θ path, with the sample as its own reference.
        reference = sample if stn.config.conditioning == "reference" else None
        stn.predict_theta(sample, reference)
    finally:
        for handle in handles:
            handle.remove()

    layers = [
        {
            "name": name,
            "type": type(module).__name__,
            "output_shapes": shapes.get(name, []),
            "parameters": sum(p.numel() for p in module.parameters(recurse=False)),
        }
        for name, module in leaves
    ]
    in_leaves = {f"{name}.{p}" for name, module in leaves for p, _ in module.named_parameters(recurse=False)}
    other = [
        {"name": name, "shape": list(p.shape), "parameters": p.numel()}
        for name, p in stn.named_parameters()
        if name not in in_leaves
    ]
    return {
        "input_shape": list(sample.shape[1:]),
        "layers": layers,
        "other_parameters": other,
        "activation_shapes": _localization_shapes(calls),
        "total_parameters": sum(p.numel() for p in stn.parameters()),
        "trainable_parameters": sum(p.numel() for p in stn.parameters() if p.requires_grad),
    }


def _localization_shapes(calls: list[tuple[str, list[int]]]) -> list[list[int]]:
    """Shapes out of ``localization.*`` layers in the first pass through it, each change kept once."""
    shapes: list[list[int]] = []
    seen_layers: set[str] = set()
    for name, shape in calls:
        if not name.startswith("localization."):
            continue
        if name in seen_layers:  # the localisation net runs again: its first pass is the answer
            break
        seen_layers.add(name)
        if not shapes or shapes[-1] != shape:
            shapes.append(shape)
    return shapes


# ---------------------------------------------------------------------------------- identity check
@torch.no_grad()
def identity_check(pipe, latents: torch.Tensor) -> dict:
    """θ for zero-misalignment pairs: each latent ``(B, C, h, w)`` aligned onto itself by ``pipe``'s STN
    (an :class:`~stn_diffusers.STNAlignmentPipeline`, :data:`BATCH_SIZE` latents at a time).

    A model that does no harm returns identity θ and leaves the latents as they are. Returns
    ``{"num_samples", "identity_rate", "max_theta_deviation", "mean_theta", "latent_difference"}``;
    ``identity_rate`` is the share of samples whose θ lies within :data:`IDENTITY_TOLERANCE` of
    the identity in every entry, ``latent_difference`` the mean ``|warp(x, θ) - x|``.
    """
    # Imported here: the CLI imports this module for its defaults, and diffusers takes seconds to load.
    from .pipelines.pipeline_stn_alignment import STNAlignmentPipeline

    if not isinstance(pipe, STNAlignmentPipeline):
        raise TypeError(f"expected an STNAlignmentPipeline (its θ path batches the latents), got {type(pipe).__name__}")
    latents = latents.float().cpu()
    theta = pipe.predict_theta(latents, latents, batch_size=BATCH_SIZE).cpu()
    deviation = (theta - geometry.identity_theta(theta.shape[0])).abs().flatten(1).amax(dim=1)  # (B,)
    warped = geometry.warp(latents, theta, padding_mode=pipe.stn.config.padding_mode)
    return {
        "num_samples": int(theta.shape[0]),
        "identity_rate": float((deviation <= IDENTITY_TOLERANCE).float().mean()),
        "max_theta_deviation": float(deviation.max()),
        "mean_theta": theta.mean(dim=0).tolist(),
        "latent_difference": float((warped - latents).abs().mean()),
    }


# ---------------------------------------------------------------------------------- gradient flow
def corner_error_loss(
    stn, moving: torch.Tensor, reference: torch.Tensor, true_theta: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The fine-tuning loss (``losses.training_loss``, corner error only) of one batch of latents
    ``(B, C, h, w)`` against ``true_theta`` ``(B, 2, 3)``, for ``height × width`` square pixel pairs."""
    from .losses import training_loss

    if height != width:
        raise ValueError(
            f"expected square pairs (the fine-tuning loss measures resolution × resolution), got {height}×{width}"
        )
    # training_loss passes the reference on only to an STN that looks at one.
    batch = {
        "moving": moving.to(device=stn.device, dtype=stn.dtype),
        "reference": reference.to(device=stn.device, dtype=stn.dtype),
        "theta": true_theta.to(stn.device),
    }
    loss, _ = training_loss(stn, batch, height)
    return loss


def gradient_flow(
    stn, moving: torch.Tensor, reference: torch.Tensor, true_theta: torch.Tensor, height: int, width: int
) -> dict:
    """Gradient norm of every parameter for one batch of :func:`corner_error_loss`.

    Latents ``(B, C, h, w)``, ``true_theta`` ``(B, 2, 3)``, pixel size ``height × width``. The
    model's ``.grad`` fields are left as they were. Returns ``{"loss", "mean_grad_norm" (over
    parameter tensors), "parameters": [{"name",
    "module", "shape", "grad_norm"}], "modules_with_gradient", "modules_without_gradient"}``.
    """
    parameters = dict(stn.named_parameters())
    saved = {name: p.grad for name, p in parameters.items()}
    flags = {name: p.requires_grad for name, p in parameters.items()}
    try:
        for p in parameters.values():
            p.grad = None
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = corner_error_loss(stn, moving, reference, true_theta, height, width)
            loss.backward()
        rows = [
            {
                "name": name,
                "module": name.rsplit(".", 1)[0] if "." in name else name,
                "shape": list(p.shape),
                "grad_norm": float(p.grad.norm()) if p.grad is not None else 0.0,
            }
            for name, p in parameters.items()
        ]
    finally:
        for name, p in parameters.items():
            p.grad = saved[name]
            p.requires_grad_(flags[name])
    modules = list(dict.fromkeys(row["module"] for row in rows))
    alive = {row["module"] for row in rows if row["grad_norm"] > 0}
    return {
        "loss": float(loss.detach()),
        "mean_grad_norm": float(np.mean([row["grad_norm"] for row in rows])),
        "parameters": rows,
        "modules_with_gradient": [m for m in modules if m in alive],
        "modules_without_gradient": [m for m in modules if m not in alive],
    }


# ---------------------------------------------------------------------------------- θ statistics
def theta_statistics(predicted: torch.Tensor, true: torch.Tensor, height: int, width: int) -> dict:
    """Predicted against true affine θ ``(B, 2, 3)`` for ``height × width`` pixel pairs.

    Returns the mean absolute error per entry (``(2, 3)``) and over all entries, and the corner
    error (pixels) of the prediction and of the identity (doing nothing), each summarised by
    :func:`~stn_diffusers.metrics.summarize_errors`.
    """
    if predicted.shape != true.shape or tuple(true.shape[1:]) != (2, 3):
        raise ValueError(
            "expected predicted and true θ of one shape (B, 2, 3), "
            f"got {tuple(predicted.shape)} and {tuple(true.shape)}"
        )
    identity = geometry.identity_theta(true.shape[0])
    errors = geometry.corner_error(predicted.double(), true.double(), height, width)
    baseline = geometry.corner_error(identity.double(), true.double(), height, width)
    absolute = (predicted - true).abs()
    return {
        "num_pairs": int(true.shape[0]),
        "image_size": [height, width],
        "mae_per_entry": absolute.mean(dim=0).tolist(),
        "mae": float(absolute.mean()),
        "corner_error": metrics.summarize_errors(errors),
        "identity_corner_error": metrics.summarize_errors(baseline),
        "corner_errors": errors.tolist(),
        "identity_corner_errors": baseline.tolist(),
    }


# ----------------------------------------------------------------------------------------- figures
def _subplots(rows: int, columns: int, figsize: tuple[float, float]):
    """A figure and its ``rows × columns`` axes (always 2-D), drawn with Agg.

    ``matplotlib.figure.Figure`` rather than pyplot: figures are files, and the caller's pyplot
    backend (a notebook's inline one) is left alone. Imported here so the CLI starts fast. The tight
    layout is applied when the figure is saved, once every label is on it.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="tight")
    return figure, figure.subplots(rows, columns, squeeze=False)


def gradient_flow_figure(flow: dict) -> Figure:
    """Horizontal bars of per-parameter gradient norms (log scale); zero gradients in red at the floor."""
    rows = flow["parameters"]
    norms = np.array([row["grad_norm"] for row in rows])
    positive = norms[norms > 0]
    floor = positive.min() / 10 if positive.size else 1e-12
    figure, axes = _subplots(1, 1, (8, 0.3 * len(rows) + 1.2))
    axis = axes[0][0]
    colours = ["tab:blue" if n > 0 else "tab:red" for n in norms]
    axis.barh(range(len(rows)), np.maximum(norms, floor), color=colours)
    axis.set_yticks(range(len(rows)), [row["name"] for row in rows], fontsize=7)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("gradient norm (red: exactly zero)")
    axis.set_title(f"Gradient flow, corner-error loss {flow['loss']:.3f} px")
    return figure


def theta_scatter_figure(predicted: torch.Tensor, true: torch.Tensor, stats: dict) -> Figure:
    """Predicted against true value of each θ entry, ``(B, 2, 3)`` each, with the diagonal."""
    figure, axes = _subplots(2, 3, (10, 6.5))
    mae = stats["mae_per_entry"]
    for row in range(2):
        for column in range(3):
            axis = axes[row][column]
            x, y = true[:, row, column].numpy(), predicted[:, row, column].numpy()
            low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            axis.plot([low, high], [low, high], color="grey", linewidth=1)
            axis.scatter(x, y, s=12)
            axis.set_title(f"θ[{row},{column}]  MAE {mae[row][column]:.4f}", fontsize=9)
            axis.set_xlabel("true", fontsize=8)
            axis.set_ylabel("predicted", fontsize=8)
    figure.suptitle(f"Predicted vs true θ ({stats['num_pairs']} pairs, mean absolute error {stats['mae']:.4f})")
    return figure


def corner_error_figure(stats: dict) -> Figure:
    """Histogram of corner errors for the model and for doing nothing, with median and p90."""
    figure, axes = _subplots(1, 1, (7, 4))
    axis = axes[0][0]
    model, baseline = np.array(stats["corner_errors"]), np.array(stats["identity_corner_errors"])
    bins = np.linspace(0, max(model.max(), baseline.max()) * 1.05 + 1e-6, 25)
    axis.hist(baseline, bins=bins, alpha=0.5, label="identity (before)", color="tab:grey")
    axis.hist(model, bins=bins, alpha=0.7, label="stn", color="tab:blue")
    for name, style in (("median", "-"), ("p90", "--")):
        value = stats["corner_error"][name]
        axis.axvline(value, color="tab:blue", linestyle=style, label=f"stn {name} {value:.2f} px")
    axis.set_xlabel(f"corner error (px, {stats['image_size'][1]}×{stats['image_size'][0]})")
    axis.set_ylabel("pairs")
    axis.legend(fontsize=8)
    return figure


def _show(axis, image: torch.Tensor, title: str) -> None:
    axis.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axis.set_title(title, fontsize=8)
    axis.axis("off")


@torch.no_grad()
def grid_figures(
    pipe, pairs: list[Pair], moving_latents: torch.Tensor, reference_latents: torch.Tensor
) -> tuple[Figure, Figure]:
    """The grid (one row per pair: reference | moving | aligned (pixel warp) | aligned (decoded) |
    difference before | difference after) and the latents figure (the latent channels of the
    reference, the moving latents and the aligned ones), aligned through ``pipe`` itself.

    Latents ``(B, C, h, w)``, one per pair. Returns ``(grid, latents)``.
    """
    output = pipe(
        [pair.moving for pair in pairs],
        latents=moving_latents,
        reference_latents=reference_latents,
        output_type="pt",
    )
    grid, axes = _subplots(len(pairs), 6, (15, 2.6 * len(pairs)))
    for index, pair in enumerate(pairs):
        warped, decoded = output.warped_images[index], output.images[index]
        before = ((pair.moving - pair.reference).abs() * 3).clamp(0, 1)
        covered = geometry.valid_mask(output.theta[index : index + 1], *pair.reference.shape[-2:])[0]
        after = ((warped - pair.reference).abs() * 3 * covered).clamp(0, 1)
        panels = [
            (pair.reference, "reference"),
            (pair.moving, "moving"),
            (warped, "aligned (pixel warp)"),
            (decoded, "aligned (decoded)"),
            (before, "|moving - ref| ×3"),
            (after, "|aligned - ref| ×3 (covered)"),
        ]
        for axis, (image, title) in zip(axes[index], panels):
            _show(axis, image, f"{pair.name}: {title}" if axis is axes[index][0] else title)

    channels = moving_latents.shape[1]
    latents, axes = _subplots(3 * len(pairs), channels, (2.2 * channels, 6.6 * len(pairs)))
    for index in range(len(pairs)):
        rows = (
            ("reference", reference_latents[index]),
            ("before", moving_latents[index]),
            ("after", output.latents[index].float().cpu()),
        )
        for offset, (label, latent) in enumerate(rows):
            limit = float(latent.abs().max()) or 1.0
            for channel in range(channels):
                axis = axes[3 * index + offset][channel]
                axis.imshow(latent[channel].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
                axis.set_title(f"pair {index} {label}, channel {channel}", fontsize=7)
                axis.axis("off")
    return grid, latents


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object a line; blank lines skipped)."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                message = f"expected one JSON object per line in {str(path)!r}, line {number}: {error}"
                raise ValueError(message) from None
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if "step" in r and isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves_figure(records: list[dict]) -> tuple[Figure, dict]:
    """Loss (every key with ``loss`` in its name) and validation corner error (every key with
    ``corner`` or ``mace``) against ``step``; returns the figure and each series' last value."""
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    groups = {
        "loss": [k for k in keys if "loss" in k],
        "corner error (px)": [k for k in keys if ("corner" in k or "mace" in k) and "loss" not in k],
    }
    groups = {title: members for title, members in groups.items() if members}
    if not groups:
        raise ValueError(f"expected metrics with a 'step' and a loss or corner-error value, got keys {keys}")
    figure, axes = _subplots(1, len(groups), (6 * len(groups), 4))
    last = {}
    for axis, (title, members) in zip(axes[0], groups.items()):
        for key in members:
            steps, values = _series(records, key)
            if steps:
                axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
                last[key] = values[-1]
        axis.set_xlabel("step")
        axis.set_ylabel(title)
        axis.legend(fontsize=8)
    return figure, last


def _figure_writers(figures: dict[Path, Figure]) -> dict[Path, files.Writer]:
    """``{path: figure}`` → :func:`~stn_diffusers.files.write_outputs` writers, each in its path's format."""
    return {path: files.figure_writer(figure, path, dpi=FIGURE_DPI) for path, figure in figures.items()}


# ------------------------------------------------------------------------------ one figure to a file
# analyze writes its figures together with the report; this writes one measurement's figures on
# their own (a notebook's view of it), all or none, making the folder when it is missing.
def _write_figures(figures: dict[str | Path, Figure]) -> list[Path]:
    paths = {Path(path): figure for path, figure in figures.items()}
    for path in paths:
        files.check_writable_folder(path.parent, f"the figure {str(path)!r}")
    files.write_outputs(_figure_writers(paths))
    return list(paths)


def plot_training_curves(records: list[dict], path: str | Path) -> tuple[Path, dict]:
    """:func:`training_curves_figure` written to ``path``; returns the path and each series' last value."""
    figure, last = training_curves_figure(records)
    return _write_figures({path: figure})[0], last


# ------------------------------------------------------------------------------------------ report
def analyze(
    pipe,
    output_dir: str | Path,
    sources: list[torch.Tensor] | None = None,
    names: list[str] | None = None,
    num_pairs: int = DEFAULT_NUM_PAIRS,
    warp: str = "standard",
    seed: int = 0,
    num_visual: int = DEFAULT_NUM_VISUAL,
    pipeline_dir: str | Path | None = None,
) -> dict:
    """Analyse ``pipe``'s STN and write ``report.json``, ``report.md`` and figures to ``output_dir``.

    ``output_dir`` is made and checked first; the files are written only once everything is
    measured and drawn, all or none (:func:`stn_diffusers.files.write_outputs`).

    Args:
        pipe: an :class:`~stn_diffusers.STNAlignmentPipeline`.
        sources: photos ``(3, H, W)`` in ``[0, 1]`` to cut seeded pairs from (default: the bundled ones).
        names: a name per source, for the grid.
        num_pairs: pairs for the identity check and θ statistics; the gradient uses one batch of them.
        warp: misalignment preset of the pairs (see ``geometry.WARP_PRESETS``).
        seed: pairs are identical for the same seed and sources.
        num_visual: pairs shown in the grid.
        pipeline_dir: the folder ``pipe`` came from; its ``metrics.jsonl`` becomes training curves.

    Returns:
        The report (what ``report.json`` holds).
    """
    if int(num_pairs) < 1:
        raise ValueError(f"expected num_pairs >= 1, got {num_pairs}")
    # The θ statistics and figures read the six entries of an affine θ.
    if geometry.get_warp_range(warp).perspective > 0 or pipe.stn.config.transform == "homography":
        raise ValueError(
            f"expected an affine warp and stn (the report compares the 2×3 entries of θ), got warp={warp!r} and "
            f"transform={pipe.stn.config.transform!r}; measure homographies with `stn-diffusers evaluate`"
        )
    if int(num_visual) < 0:
        raise ValueError(f"expected num_visual >= 0, got {num_visual}")
    output_dir = Path(output_dir)
    files.check_output_folder(output_dir, "output_dir")
    if sources is None:
        sources, names = bundled_photos()
    stn = pipe.stn
    resolution = analysis_resolution(pipe)

    # 1. Pairs and their latents, encoded once and shared by every measurement
    pairs = seeded_pairs(sources, int(num_pairs), resolution, warp, seed, names=names)
    with torch.no_grad():  # scaled latents (N, C, h, w)
        references = pipe.encode_images([p.reference for p in pairs], resolution, resolution, batch_size=BATCH_SIZE)
        moving = pipe.encode_images([p.moving for p in pairs], resolution, resolution, batch_size=BATCH_SIZE)
    references, moving = references.float().cpu(), moving.float().cpu()
    true_theta = torch.stack([pair.theta for pair in pairs])

    # 2. Measure
    report = {
        "stn_config": {k: v for k, v in stn.config.items() if not k.startswith("_")},
        "pairs": {
            "num_pairs": len(pairs), "resolution": resolution, "warp": warp, "seed": seed, "sources": len(sources)
        },
        "architecture": layer_table(stn),
        # Zero misalignment: each reference against itself.
        "identity": identity_check(pipe, references),
        "gradient_flow": gradient_flow(
            stn, moving[:BATCH_SIZE], references[:BATCH_SIZE], true_theta[:BATCH_SIZE], resolution, resolution
        ),
    }
    with torch.no_grad():
        predicted = pipe.predict_theta(moving, references, batch_size=BATCH_SIZE).cpu()
    report["theta"] = theta_statistics(predicted, true_theta, resolution, resolution)

    # 3. Figures, drawn in memory
    figures = {
        "gradient_flow": gradient_flow_figure(report["gradient_flow"]),
        "theta_scatter": theta_scatter_figure(predicted, true_theta, report["theta"]),
        "corner_error": corner_error_figure(report["theta"]),
    }
    shown = min(int(num_visual), len(pairs))
    if shown:
        figures["grid"], figures["latents"] = grid_figures(pipe, pairs[:shown], moving[:shown], references[:shown])
    metrics_path = Path(pipeline_dir) / METRICS_FILE if pipeline_dir is not None else None
    if metrics_path is not None and metrics_path.is_file():
        records = read_metrics(metrics_path)
        figures["training_curves"], last = training_curves_figure(records)
        report["training"] = {"metrics": str(metrics_path), "records": len(records), "last": last}
    report["figures"] = {name: FIGURES[name] for name in figures}

    # 4. Write the figures and the report, all or none
    writers = _figure_writers({output_dir / FIGURES[name]: figure for name, figure in figures.items()})
    writers[output_dir / REPORT_JSON] = files.text_writer(json.dumps(report, indent=2))
    writers[output_dir / REPORT_MARKDOWN] = files.text_writer(format_markdown(report))
    files.write_outputs(writers)
    return report


def _shape(shape: list[int]) -> str:
    return "×".join(str(s) for s in shape)


def format_markdown(report: dict) -> str:
    """``report.md``: the report's tables (written by :func:`stn_diffusers.metrics.markdown_table`),
    with its figures inline."""
    architecture, identity = report["architecture"], report["identity"]
    flow, theta = report["gradient_flow"], report["theta"]
    figures = report["figures"]
    config = report["stn_config"]
    pairs = report["pairs"]
    layer_rows = [
        [
            f"`{layer['name']}`",
            layer["type"],
            ", ".join(_shape(s) for s in layer["output_shapes"]) or "—",
            f"{layer['parameters']:,}",
        ]
        for layer in architecture["layers"]
    ]
    layer_rows += [
        [f"`{other['name']}`", f"Parameter {_shape(other['shape'])}", "—", f"{other['parameters']:,}"]
        for other in architecture["other_parameters"]
    ]
    gradient_rows = [
        [f"`{row['name']}`", _shape(row["shape"]), f"{row['grad_norm']:.3e}"] for row in flow["parameters"]
    ]
    mae_row = ["MAE", *(f"{v:.4f}" for row in theta["mae_per_entry"] for v in row)]
    height, width = theta["image_size"]
    corner_rows = [
        [label, *metrics.summary_cells(theta[key])]
        for label, key in (("identity (before)", "identity_corner_error"), ("stn", "corner_error"))
    ]
    lines = [
        "# STN analysis",
        "",
        f"Model: `architecture={config['architecture']}`, `conditioning={config['conditioning']}`, "
        f"`transform={config['transform']}`, `sample_size={config['sample_size']}`. Pairs: {pairs['num_pairs']} "
        f"seeded `{pairs['warp']}` pairs at {pairs['resolution']}×{pairs['resolution']} from {pairs['sources']} "
        f"photo(s), seed {pairs['seed']}.",
        "",
        "## Architecture",
        "",
        f"Input {_shape(architecture['input_shape'])}; localisation activations "
        + " → ".join(_shape(s) for s in architecture["activation_shapes"])
        + f". **{architecture['total_parameters']:,} parameters** "
        f"({architecture['trainable_parameters']:,} trainable).",
        "",
        metrics.markdown_table(["layer", "type", "output shape(s)", "parameters"], layer_rows),
        "",
        "## Identity check",
        "",
        f"Zero-misalignment pairs (each reference against itself), {identity['num_samples']} samples: identity rate "
        f"**{identity['identity_rate']:.1%}** (θ within {IDENTITY_TOLERANCE:g} of identity in every entry), "
        f"largest θ deviation {identity['max_theta_deviation']:.2e}, mean absolute latent difference "
        f"{identity['latent_difference']:.2e}.",
        "",
        "## Gradient flow",
        "",
        f"One batch of the corner-error loss ({flow['loss']:.3f} px), mean gradient norm {flow['mean_grad_norm']:.3e}. "
        "Modules with gradient: "
        + (", ".join(f"`{m}`" for m in flow["modules_with_gradient"]) or "none")
        + "; without: "
        + (", ".join(f"`{m}`" for m in flow["modules_without_gradient"]) or "none")
        + ".",
        "",
        metrics.markdown_table(["parameter", "shape", "gradient norm"], gradient_rows),
        "",
        f"![gradient flow]({figures['gradient_flow']})",
        "",
        "## θ statistics",
        "",
        f"Mean absolute error of θ against the truth: **{theta['mae']:.4f}**.",
        "",
        metrics.markdown_table(["", *THETA_ENTRIES], [mae_row]),
        "",
        metrics.markdown_table([f"corner error (px, {width}×{height})", *metrics.SUMMARY_HEADER], corner_rows),
        "",
        f"![theta scatter]({figures['theta_scatter']})",
        "",
        f"![corner error]({figures['corner_error']})",
        "",
    ]
    if "grid" in figures:
        lines += ["## Visual grid", "", f"![grid]({figures['grid']})", "", f"![latents]({figures['latents']})", ""]
    if "training" in report:
        last = ", ".join(f"{k} {v:.4g}" for k, v in report["training"]["last"].items())
        lines += ["## Training curves", "", f"{report['training']['records']} records; last: {last}.", "",
                  f"![training curves]({figures['training_curves']})", ""]  # fmt: skip
    return "\n".join(lines)


__all__ = [
    "analyze",
    "corner_error_figure",
    "corner_error_loss",
    "format_markdown",
    "grid_figures",
    "gradient_flow",
    "gradient_flow_figure",
    "identity_check",
    "layer_table",
    "plot_training_curves",
    "read_metrics",
    "theta_scatter_figure",
    "theta_statistics",
    "training_curves_figure",
]
