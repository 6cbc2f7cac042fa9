"""One vocabulary for corner-error statistics and one markdown-table writer.

Every report of the project (evaluation, analysis, fine-tuning validation, the demo) summarises
per-pair mean corner errors (MACE, :func:`stn_diffusers.geometry.corner_error`) with
:func:`summarize_errors`, so a statistic has the same key everywhere:

* ``mean``, ``median``, ``p90``: pixels;
* ``under_1px``, ``under_2px``, ``under_5px``: the share of pairs whose error is below the threshold.

Time per pair (:data:`TIME_PER_PAIR`) means one thing in every table: seconds to estimate θ for one
pair *with the latents given* (no VAE encode); where a table also shows the time with the encodes,
that column says so (:data:`TIME_PER_PAIR_WITH_ENCODE`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Thresholds in pixels of the ``under_{t}px`` rates.
SUCCESS_THRESHOLDS = (1, 2, 5)
TIME_PER_PAIR = "time / pair (latents given)"
TIME_PER_PAIR_WITH_ENCODE = "time / pair (with both encodes)"


def threshold_key(threshold: float) -> str:
    """``under_5px`` for 5: the key of the share of pairs below ``threshold`` pixels."""
    return f"under_{threshold:g}px"


def summarize_errors(errors: Sequence[float] | np.ndarray | torch.Tensor) -> dict[str, float]:
    """Corner errors in pixels ``(N,)`` → ``{"mean", "median", "p90", "under_1px", "under_2px", "under_5px"}``.

    Raises ``ValueError`` for an empty set: a summary of nothing would be NaN everywhere.
    """
    if isinstance(errors, torch.Tensor):
        errors = errors.detach().double().cpu().numpy()
    values = np.asarray(errors, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("expected at least one corner error to summarise, got none")
    summary = {"mean": float(values.mean()), "median": float(np.median(values)), "p90": float(np.percentile(values, 90))}
    summary.update({threshold_key(t): float((values < t).mean()) for t in SUCCESS_THRESHOLDS})
    return summary


def format_milliseconds(seconds: float | None) -> str:
    """``0.0123`` → ``"12.3 ms"``; ``None`` or NaN → ``"—"``."""
    if seconds is None or seconds != seconds:
        return "—"
    return f"{seconds * 1000:.1f} ms"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table: one header row, a rule, then ``rows`` (cells formatted with ``str``).

    Raises ``ValueError`` when a row's length differs from the header's.
    """
    for index, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"expected {len(header)} cells in row {index} (one per column), got {len(row)}")
    lines = ["| " + " | ".join(str(cell) for cell in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
