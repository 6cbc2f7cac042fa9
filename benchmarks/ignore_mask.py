"""What an ignore mask is worth: STN and STN + ECC on pairs where part of the moving image changed.

    taskset -c 0 python benchmarks/ignore_mask.py --data data/photos/heldout --num-pairs 24
    taskset -c 0 python benchmarks/ignore_mask.py --data data/photos/heldout --local-change 0.1 0.3
    python benchmarks/ignore_mask.py --local-change 0.3 --warp small     # the bundled photos

Seeded pairs (:func:`stn_diffusers.data.seeded_pairs`) with ``--local-change`` of each moving image
(one share, or a range spread evenly over the pairs) replaced by content of another photo
(``Pair.changed``, in the moving frame). The same pipeline aligns three versions of the same pairs:

* ``clean``: the pairs without the change (``local_change=0``), the reference point;
* ``changed``: with the change, every pixel used;
* ``changed, masked``: with the change and ``ignore_mask`` set to the changed region in the
  reference frame (``geometry.warp(changed, θ, mode="nearest")``).

Each is scored for the STN alone (the pipeline's θ) and for STN + ECC (``refine_theta_ecc`` from the
STN's θ with ``reference_mask`` = the kept pixels, what ``refine="ecc"`` runs in the pipeline).
Errors are MACE in pixels at the pair resolution; ``mean / clean`` divides a row's mean error by that
of the same method on the clean pairs. One thread for torch and OpenCV.
"""

from __future__ import annotations

import argparse

import torch

from stn_diffusers import data, geometry, metrics
from stn_diffusers.cli import load_pipeline
from stn_diffusers.evaluation import pair_error
from stn_diffusers.refine import import_cv2, refine_theta_ecc

CONDITIONS = ("clean", "changed", "changed, masked")


def reference_frame_change(pair: data.Pair) -> torch.Tensor:
    """The changed pixels of ``pair`` (``Pair.changed``, moving frame) in the reference frame, ``(1, S, S)``."""
    return geometry.warp(pair.changed[None], pair.theta[None], mode="nearest")[0]


def align(pipe, pair: data.Pair, ignore: torch.Tensor | None) -> tuple[float, float, bool]:
    """``(STN error, STN + ECC error, ECC kept its refinement)`` on ``pair``, ``ignore`` ``(1, S, S)``
    (1 = ignore) the reference pixels left out of both, or ``None``."""
    output = pipe(pair.moving, reference=pair.reference, output_type="latent", ignore_mask=ignore)
    theta = output.theta.cpu()
    motion = "homography" if geometry.is_homography(theta) else "affine"
    kept = None if ignore is None else 1.0 - ignore
    refined = refine_theta_ecc(pair.reference, pair.moving, theta, motion=motion, reference_mask=kept)
    return pair_error(theta, pair), pair_error(refined.theta, pair), bool(refined.converged[0])


def measure(pipe, clean: list[data.Pair], changed: list[data.Pair]) -> dict[str, dict[str, list]]:
    """``{condition: {"stn": errors, "stn+ecc": errors, "ecc_kept": flags}}`` over the pairs."""
    results = {condition: {"stn": [], "stn+ecc": [], "ecc_kept": []} for condition in CONDITIONS}
    for clean_pair, changed_pair in zip(clean, changed):
        runs = {
            "clean": (clean_pair, None),
            "changed": (changed_pair, None),
            "changed, masked": (changed_pair, reference_frame_change(changed_pair)),
        }
        for condition, (pair, ignore) in runs.items():
            stn_error, ecc_error, ecc_kept = align(pipe, pair, ignore)
            results[condition]["stn"].append(stn_error)
            results[condition]["stn+ecc"].append(ecc_error)
            results[condition]["ecc_kept"].append(ecc_kept)
    return results


def table(results: dict[str, dict[str, list]]) -> str:
    """One row per condition and method: the error summary, the mean against the clean pairs', and how
    often ECC kept its refinement."""
    header = ("pairs", "method", *metrics.SUMMARY_HEADER, "mean / clean", "ECC kept")
    rows = []
    for condition, measured in results.items():
        for method in ("stn", "stn+ecc"):
            summary = metrics.summarize_errors(measured[method])
            clean_mean = metrics.summarize_errors(results["clean"][method])["mean"]
            kept = measured["ecc_kept"]
            ecc_cell = f"{sum(kept)}/{len(kept)}" if method == "stn+ecc" else "—"
            ratio = f"{summary['mean'] / clean_mean:.2f}×" if clean_mean > 0 else "—"
            rows.append([condition, method, *metrics.summary_cells(summary), ratio, ecc_cell])
    return metrics.markdown_table(header, rows)


def change_shares(local_change: list[float], num_pairs: int) -> list[float]:
    """The share of each pair's moving image replaced: ``local_change`` ``[share]`` for every pair, or
    ``[low, high]`` spread evenly from ``low`` (first pair) to ``high`` (last pair)."""
    low, high = local_change[0], local_change[-1]
    return [low + (high - low) * i / max(num_pairs - 1, 1) for i in range(num_pairs)]


def describe_shares(local_change: list[float]) -> str:
    if len(local_change) == 1 or local_change[0] == local_change[1]:
        return f"{local_change[0]:.0%}"
    return f"{local_change[0]:.0%} to {local_change[1]:.0%} (spread evenly over the pairs)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="folder of photos (default: the photos bundled with the package)")
    parser.add_argument("--pipeline", default=None, help="saved pipeline folder (default: the embedded one)")
    parser.add_argument("--num-pairs", type=int, default=24, help="seeded pairs (cycling over the photos)")
    parser.add_argument("--resolution", type=int, default=512, help="pixel side of the square pairs")
    parser.add_argument("--warp", default="standard", choices=tuple(geometry.WARP_PRESETS), help="misalignment")
    parser.add_argument(
        "--local-change", type=float, nargs="+", default=[0.2], metavar="SHARE",
        help="share of each moving image replaced; two values: a range, spread evenly over the pairs",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if len(args.local_change) > 2 or not all(0.0 < share < 1.0 for share in args.local_change):
        raise SystemExit(f"error: expected one or two --local-change values in (0, 1), got {args.local_change}")
    torch.set_num_threads(1)
    import_cv2().setNumThreads(1)
    if args.data:
        sources, paths = data.load_photo_folder(args.data)
        names = [path.name for path in paths]
    else:
        sources, names = data.bundled_photos()
    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    settings = dict(resolution=args.resolution, warp=args.warp, seed=args.seed, names=names)
    # The same seeded pairs with and without the change: local changes draw from generators of their own.
    clean = data.seeded_pairs(sources, args.num_pairs, **settings)
    shares = change_shares(args.local_change, args.num_pairs)
    changed = [data.seeded_pair(sources, i, local_change=share, **settings) for i, share in enumerate(shares)]
    results = measure(pipe, clean, changed)
    print(
        f"{args.num_pairs} pairs from {args.data or 'the bundled photos'}, {args.resolution}×{args.resolution}, "
        f"warp `{args.warp}`, {describe_shares(args.local_change)} of each moving image replaced, seed {args.seed}, "
        f"pipeline {args.pipeline or 'embedded default'}. MACE in pixels."
    )
    print()
    print(table(results))


if __name__ == "__main__":
    main()
