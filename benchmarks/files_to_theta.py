"""Files to θ: the time from two image files on disk to the answer, the pipeline against SIFT + RANSAC.

    python benchmarks/files_to_theta.py --data data/photos/heldout              # the embedded default
    python benchmarks/files_to_theta.py --data data/photos/heldout --pipeline DIR --warp large

Seeded pairs from the photos (512×512, ``--warp``) are written as PNG files first. Then, for each
pair and in the same process, one thread each:
- ``stn``: both files opened (``stn_diffusers.images.load_image``), the pipeline called with
  ``output_type="latent"`` (both encodes in one batch, the STN, no decode, no pixel warp);
- ``stn+ecc``: the same with ``refine="ecc"``;
- ``sift``: both files read by OpenCV, SIFT, ratio test and RANSAC (``estimateAffine2D``), as
  ``stn-diffusers evaluate`` runs it.
Each method runs once on every pair before timing (caches, kernel selection). The table gives the
median and mean seconds per pair and the corner error, so speed and accuracy come from one run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stn_diffusers import data, geometry
from stn_diffusers.cli import load_pipeline
from stn_diffusers.evaluation import estimate_features
from stn_diffusers.images import load_image, tensor_to_pil
from stn_diffusers.refine import import_cv2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/photos/heldout", help="folder of photos")
    parser.add_argument("--pipeline", default=None, help="saved pipeline folder (default: the embedded one)")
    parser.add_argument("--warp", default="standard", help="warp range of the seeded pairs")
    parser.add_argument("--num-pairs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all pairs; the median is kept")
    return parser.parse_args()


def write_pairs(pairs: list[data.Pair], folder: Path) -> list[tuple[Path, Path]]:
    paths = []
    for index, pair in enumerate(pairs):
        moving, reference = folder / f"{index:03d}_moving.png", folder / f"{index:03d}_reference.png"
        tensor_to_pil(pair.moving).save(moving, compress_level=1)
        tensor_to_pil(pair.reference).save(reference, compress_level=1)
        paths.append((moving, reference))
    return paths


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cv2 = import_cv2()
    cv2.setNumThreads(1)
    sources, names = data.load_photo_folder(args.data)
    pairs = data.seeded_pairs(sources, args.num_pairs, 512, args.warp, seed=args.seed, names=[p.stem for p in names])
    pipe = load_pipeline(args.pipeline)

    def run_stn(moving: Path, reference: Path, refine: str | None = None) -> torch.Tensor:
        image, ref = load_image(moving), load_image(reference)
        return pipe(image, reference=ref, output_type="latent", refine=refine).theta

    def run_sift(moving: Path, reference: Path) -> torch.Tensor:
        image = cv2.imread(str(moving), cv2.IMREAD_COLOR)[..., ::-1].copy()
        ref = cv2.imread(str(reference), cv2.IMREAD_COLOR)[..., ::-1].copy()
        to_tensor = lambda array: torch.from_numpy(array).permute(2, 0, 1).float().div(255)  # noqa: E731
        return estimate_features(to_tensor(ref), to_tensor(image), "sift")

    methods = {"stn": run_stn, "stn+ecc": lambda m, r: run_stn(m, r, "ecc"), "sift": run_sift}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_pairs(pairs, Path(folder))
        rows = {}
        for name, method in methods.items():
            errors, passes = [], []
            for repeat in range(args.repeats + 1):
                seconds = []
                for (moving, reference), pair in zip(paths, pairs):
                    start = time.perf_counter()
                    try:
                        theta = method(moving, reference)
                    except Exception:  # a failed estimate scores as the identity, timed all the same
                        theta = geometry.identity_theta(1)
                    seconds.append(time.perf_counter() - start)
                    if repeat == 0:
                        errors.append(float(geometry.corner_error(theta[:, :2], pair.theta[None], 512, 512)))
                if repeat > 0:  # the first pass only warms up
                    passes.append(seconds)
            per_pair = [statistics.median(times) for times in zip(*passes)]
            rows[name] = (per_pair, errors)

    print(f"{len(pairs)} pairs, 512×512 PNG files, warp `{args.warp}`, seed {args.seed}; one thread; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")  # fmt: skip
    print()
    print("| method | median time / pair | mean time / pair | median error | < 1 px | < 5 px |")
    print("|---|---|---|---|---|---|")
    for name, (per_pair, errors) in rows.items():
        under = lambda limit: sum(e < limit for e in errors) / len(errors)  # noqa: E731
        print(
            f"| {name} | {statistics.median(per_pair) * 1e3:.1f} ms | {statistics.mean(per_pair) * 1e3:.1f} ms | "
            f"{statistics.median(errors):.2f} px | {under(1):.0%} | {under(5):.0%} |"
        )
    stn, sift = statistics.median(rows["stn"][0]), statistics.median(rows["sift"][0])
    print(f"\nstn / sift (medians): {stn / sift:.2f}")


if __name__ == "__main__":
    main()
