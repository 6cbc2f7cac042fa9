"""The STN's own cost with latents given, per pair and per stage, beside pyramid ECC in the same run.

    taskset -c 0 python benchmarks/stn_speed.py --data data/photos/heldout --warp standard --repeats 5
    taskset -c 0 python benchmarks/stn_speed.py --order passes     # each method over all pairs in turn

`stn-diffusers evaluate` times each pair's estimate right after that pair's VAE encode, so the
estimate starts with caches the encoder has just filled with its own activations. Here every pair
is encoded first; then, `--repeats` times over all pairs, the pipeline's `predict_theta` (batch 1,
one thread, inference mode) and OpenCV's 3-level pyramid ECC (the `ecc` method of `evaluate`, one
thread) alternate, so a drift in the machine's speed weighs on both alike: pair by pair (the
default; each method then starts every pair on caches the other has just filled) or pass by pass
(`--order passes`: each method over all pairs in turn, its caches warm, as in a batch job).
Reported: the median and mean per pair, and the median of each stage of the
search-refine design (features, search, candidate selection, refinement, identity test) from a
profile of one pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stn_diffusers import data, geometry, metrics
from stn_diffusers.cli import load_pipeline
from stn_diffusers.evaluation import CLASSICAL_ESTIMATORS

STAGES = {
    "search": "similarity_search.py",
    "selection (3 candidates, stride 4)": "_select",
    "refinement (strides 2, 1)": "_refine",
    "identity test": "compare_with_identity",
    "reference prepared": "prepare",
}


def encoded_pairs(pipe, folder: str, num_pairs: int, warp: str, seed: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Seeded 512×512 pairs cut from the photos in ``folder``, and their moving and reference latents
    ``(N, C, 64, 64)`` encoded by ``pipe``."""
    sources, paths = data.load_photo_folder(folder)
    pairs = data.seeded_pairs(sources, num_pairs, 512, warp, seed, names=[p.name for p in paths])
    with torch.inference_mode():
        moving = pipe.encode_images([pair.moving for pair in pairs], 512, 512, batch_size=8)
        reference = pipe.encode_images([pair.reference for pair in pairs], 512, 512, batch_size=8)
    return pairs, moving, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/photos/heldout")
    parser.add_argument("--pipeline", default=None, help="saved pipeline (default: the embedded one)")
    parser.add_argument("--num-pairs", type=int, default=24)
    parser.add_argument("--warp", default="standard")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--order",
        choices=("pairs", "passes"),
        default="pairs",
        help="alternate the two methods pair by pair (default) or pass by pass over all pairs",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    pipe = load_pipeline(args.pipeline, "cpu")
    pairs, moving, reference = encoded_pairs(pipe, args.data, args.num_pairs, args.warp, args.seed)

    stn_seconds, ecc_seconds, errors = [], [], []

    def stn(i: int) -> None:
        start = time.perf_counter()
        theta = pipe.predict_theta(moving[i : i + 1], reference[i : i + 1])
        stn_seconds.append(time.perf_counter() - start)
        errors.append(float(geometry.corner_error(theta, pairs[i].theta[None], 512, 512)))

    def ecc(i: int) -> None:
        start = time.perf_counter()
        try:
            CLASSICAL_ESTIMATORS["ecc"](pairs[i].reference, pairs[i].moving)
        except Exception:  # a failed ECC still cost its time  # noqa: BLE001
            pass
        ecc_seconds.append(time.perf_counter() - start)

    with torch.inference_mode():
        pipe.predict_theta(moving[:1], reference[:1])  # warm-up: the grid's motion basis is cached once
        for _ in range(args.repeats):
            if args.order == "pairs":
                # Pair by pair, the STN then ECC: a drift in the machine's speed weighs on both alike,
                # but each method starts every pair on caches the other has just filled.
                for i in range(len(pairs)):
                    stn(i)
                    ecc(i)
            else:
                # Each method over every pair in turn, as a batch job runs it: its caches stay warm,
                # and the passes alternate, so a drift still weighs on both.
                for method in (stn, ecc):
                    for i in range(len(pairs)):
                        method(i)

    import cProfile
    import pstats

    profile = cProfile.Profile()
    with torch.inference_mode():
        profile.enable()
        for i in range(len(pairs)):
            pipe.predict_theta(moving[i : i + 1], reference[i : i + 1])
        profile.disable()
    stats = pstats.Stats(profile).stats
    stage_ms = {}
    for stage, key in STAGES.items():
        total = sum(v[3] for (file, _, name), v in stats.items() if key in (name, file.rsplit("/", 1)[-1]))
        if key == "similarity_search.py":
            total = sum(v[3] for (file, _, name), v in stats.items() if name == "search_similarity")
        stage_ms[stage] = 1e3 * total / len(pairs)

    rows = [
        ["STN, latents given", metrics.format_milliseconds(statistics.median(stn_seconds)),
         metrics.format_milliseconds(statistics.mean(stn_seconds))],
        ["ECC, 3-level pyramid", metrics.format_milliseconds(statistics.median(ecc_seconds)),
         metrics.format_milliseconds(statistics.mean(ecc_seconds))],
    ]  # fmt: skip
    order = "pair by pair" if args.order == "pairs" else "pass by pass"
    print(f"{len(pairs)} pairs, warp `{args.warp}`, {args.repeats} passes, one thread, alternating {order}.\n")
    print(metrics.markdown_table(["method", "median / pair", "mean / pair"], rows))
    ratio = statistics.median(ecc_seconds) / statistics.median(stn_seconds)
    print(f"\nECC / STN, medians: {ratio:.1f}×; STN median corner error {statistics.median(errors):.2f} px")
    print("\nStages (profiled pass, per pair, the profiler's own overhead included):\n")
    print(metrics.markdown_table(["stage", "ms / pair"], [[k, f"{v:.2f}"] for k, v in stage_ms.items()]))


if __name__ == "__main__":
    main()
