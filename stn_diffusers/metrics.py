"""One vocabulary for corner-error statistics and one markdown-table writer.

Every report of the project (evaluation, analysis, fine-tuning validation, the demo) summarises
per-pair mean corner errors (MACE, :func:`stn_diffusers.geometry.corner_error`) with
:func:`summarize_errors`, so a statistic has the same key everywhere:

* ``mean``, ``median``, ``p90``: pixels;
* ``under_1px``, ``under_2px``, ``under_5px``: the share of pairs whose error is below the threshold.

Time per pair (:data:`TIME_PER_PAIR`) means one thing in every table (evaluation, the demo):
seconds to estimate θ for one pair *with the latents given*, no VAE encode. A method that works on
pixels (ECC, SIFT, …) has nothing to encode; a refined row (``stn+ecc``) adds the refinement to the
STN's time. Where a table also shows the time with the VAE encode of both images, that column is
:data:`TIME_PER_PAIR_WITH_ENCODE` (empty for methods with no encode). Time is measured with
:func:`seconds_since`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

# Thresholds in pixels of the ``under_{t}px`` rates.
SUCCESS_THRESHOLDS = (1, 2, 5)
TIME_PER_PAIR = "time / pair (latents given)"
TIME_PER_PAIR_WITH_ENCODE = "time / pair (with both encodes)"
# Column titles of a summary's statistics (:func:`summary_cells`), in key order.
SUMMARY_HEADER = ("mean", "median", "p90", *(f"< {t:g} px" for t in SUCCESS_THRESHOLDS))


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
    summary = {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
    }
    summary.update({threshold_key(t): float((values < t).mean()) for t in SUCCESS_THRESHOLDS})
    return summary


def summary_cells(summary: dict[str, float]) -> list[str]:
    """A :func:`summarize_errors` summary as table cells under :data:`SUMMARY_HEADER`: pixels with two
    decimals, rates as percentages."""
    cells = [f"{summary[key]:.2f}" for key in ("mean", "median", "p90")]
    return cells + [f"{summary[threshold_key(t)]:.0%}" for t in SUCCESS_THRESHOLDS]


def seconds_since(start: float, result: object = None) -> float:
    """Seconds from ``start`` (a ``time.perf_counter()`` reading) until ``result`` is computed.

    CUDA runs asynchronously: a tensor on a GPU may still be in the making when the call that returns
    it comes back, so it is waited for first; otherwise its time would be charged to the next step.
    """
    if isinstance(result, torch.Tensor) and result.is_cuda:
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - start


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
