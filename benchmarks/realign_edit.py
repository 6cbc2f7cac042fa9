"""Re-aligning simulated edit-model outputs onto their inputs (`stn_diffusers.realign_edit`).

    taskset -c 0 python benchmarks/realign_edit.py --data data/photos/heldout --num-pairs 48 \
        --json benchmarks/results/realign_edit.json

Each pair is a 512×512 crop of a held-out photo (the edit model's input) and a simulated output:
the same scene zoomed in by 1–4 % and shifted by up to 3 % of the side (what edit models do), a
region of 10–20 % replaced by another photo's content (the edit), then a resampling pass (down to
a random 85–100 % and back) or a JPEG pass (quality 80–95). The truth θ is known, so the error is
the largest corner error in pixels over the input's frame (every unedited pixel moves less than the
worst corner under an affine map). PSNR is measured on the unedited pixels the output covers: the
raw output against the input, and the re-aligned (pasted-back) output against the input.

Three settings per pair: the edit mask given (`edit_mask=`), no mask (the region is found from the
difference), and the STN alone without ECC (`refine=None`, mask given). One torch and one OpenCV thread.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from stn_diffusers import data, geometry, metrics
from stn_diffusers.cli import load_pipeline
from stn_diffusers.realign import realign_edit

RESOLUTION = 512
ZOOM = (1.01, 1.04)
SHIFT = 0.03
EDIT_FRACTION = (0.10, 0.20)


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def simulated_edit(source: torch.Tensor, donor: torch.Tensor, seed: int) -> dict:
    """One simulated edit of ``source`` ``(3, H, W)``: ``original``, ``edited`` ``(3, S, S)``, the truth
    ``theta`` ``(1, 2, 3)`` (edited → original), the edited region ``edit_mask`` ``(1, S, S)`` in the
    original's frame, and which ``pass`` was applied."""
    generator = torch.Generator().manual_seed(seed)
    zoom = _uniform(*ZOOM, generator)
    shift = [_uniform(-SHIFT, SHIFT, generator) * 2 for _ in range(2)]  # normalised units: 2 = the side
    # θ maps the original's coordinates into the output's: an output zoomed in by `zoom` samples the
    # original's point x at zoom·x (plus the shift).
    theta = torch.tensor([[[zoom, 0.0, shift[0]], [0.0, zoom, shift[1]]]])
    source = data.fit_shorter_side(source, RESOLUTION, 2 * RESOLUTION)
    # make_pair returns (reference, moving) with warp(moving, θ') ≈ reference for θ' given: here the
    # moving image is the edit output, aligned onto the original by θ.
    original, edited = data.make_pair(source, RESOLUTION, theta, generator)
    fraction = _uniform(*EDIT_FRACTION, generator)
    edited, changed = data.paste_local_change(edited, donor, fraction, generator)
    if torch.rand(1, generator=generator).item() < 0.5:
        factor = _uniform(0.85, 1.0, generator)
        small = max(16, round(RESOLUTION * factor))
        edited = torch.nn.functional.interpolate(edited[None], size=(small, small), mode="bilinear", antialias=True)
        edited = torch.nn.functional.interpolate(edited, size=(RESOLUTION, RESOLUTION), mode="bicubic")[0].clamp(0, 1)
        applied = f"resampled ×{factor:.2f}"
    else:
        quality = int(_uniform(80, 95, generator))
        buffer = io.BytesIO()
        array = (edited.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        edited = torch.from_numpy(np.asarray(PIL.Image.open(buffer).convert("RGB"), dtype=np.float32) / 255)
        edited = edited.permute(2, 0, 1)
        applied = f"JPEG q{quality}"
    edit_mask = geometry.warp(changed[None], theta, mode="nearest")[0]  # in the original's frame
    return {"original": original, "edited": edited, "theta": theta, "edit_mask": edit_mask, "pass": applied}


def max_corner_error(theta: torch.Tensor, truth: torch.Tensor, size: int = RESOLUTION) -> float:
    """The largest displacement error over the four corners, pixels: a bound for every pixel of the frame."""
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])[None]
    difference = geometry.apply_theta(theta.double(), corners.double()) - geometry.apply_theta(
        truth.double(), corners.double()
    )
    return float((difference * size / 2).norm(dim=-1).max())


def psnr(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    """PSNR in dB of ``a`` against ``b`` ``(3, H, W)`` over the ``keep`` ``(1, H, W)`` pixels."""
    mse = float(((a - b) ** 2 * keep).sum() / (3 * keep.sum()).clamp_min(1))
    return 10 * math.log10(1 / max(mse, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/photos/heldout")
    parser.add_argument("--num-pairs", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", default=None, help="saved pipeline (default: the embedded one)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--mask-only", action="store_true", help="only the setting with the edit mask given")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import cv2

    cv2.setNumThreads(1)
    sources, _ = data.load_photo_folder(args.data)
    pipe = load_pipeline(args.pipeline, "cpu")
    settings = {
        "edit mask given": {"mask": True, "refine": "ecc"},
        "no mask (region found)": {"mask": False, "refine": "ecc"},
        "STN alone, mask given": {"mask": True, "refine": None},
    }
    if args.mask_only:
        settings = {name: setting for name, setting in settings.items() if name == "edit mask given"}
    errors = {name: [] for name in settings}
    psnr_after = {name: [] for name in settings}
    psnr_before, seconds = [], {name: 0.0 for name in settings}
    for index in range(args.num_pairs):
        source = sources[index % len(sources)]
        donor = sources[(index + 1) % len(sources)]
        pair = simulated_edit(source, donor, args.seed * 100_003 + index)
        covered = geometry.warp(torch.ones(1, 1, RESOLUTION, RESOLUTION), pair["theta"], mode="nearest")[0]
        keep = covered * (1 - pair["edit_mask"])
        psnr_before.append(psnr(pair["edited"], pair["original"], keep))
        for name, setting in settings.items():
            start = time.perf_counter()
            out = realign_edit(
                pair["edited"], pair["original"], pair["edit_mask"] if setting["mask"] else None, pipeline=pipe,
                paste_back=True, refine=setting["refine"], output_type="pt",
            )  # fmt: skip
            seconds[name] += time.perf_counter() - start
            errors[name].append(max_corner_error(out.theta, pair["theta"]))
            psnr_after[name].append(psnr(out.image, pair["original"], keep))
    rows = []
    for name in settings:
        error = torch.tensor(errors[name])
        rows.append(
            [
                name,
                f"{error.median():.3f}",
                f"{error.mean():.3f}",
                f"{(error < 0.5).float().mean():.0%}",
                f"{np.mean(psnr_before):.2f}",
                f"{np.mean(psnr_after[name]):.2f}",
                metrics.format_milliseconds(seconds[name] / args.num_pairs),
            ]
        )
    header = [
        "setting", "max corner error median (px)", "mean (px)", "< 0.5 px", "unedited PSNR before (dB)",
        "after (dB)", "time / pair",
    ]  # fmt: skip
    print(f"{args.num_pairs} simulated edits, {RESOLUTION}×{RESOLUTION}, seed {args.seed}.\n")
    print(metrics.markdown_table(header, rows))
    if args.json:
        report = {
            "pairs": args.num_pairs, "seed": args.seed, "errors": errors, "psnr_before": psnr_before,
            "psnr_after": psnr_after, "seconds_per_pair": {k: v / args.num_pairs for k, v in seconds.items()},
        }  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
