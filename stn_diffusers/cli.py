"""The ``stn-diffusers`` command line: thin parsers over library functions.

    stn-diffusers align --pipeline DIR --image moving.jpg --reference reference.jpg --output aligned.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import geometry
from .images import load_image


def load_pipeline(name_or_path: str | None, device: str = "cpu"):
    """An ``STNAlignmentPipeline`` from a folder or hub id; the embedded default when ``None``."""
    from .default import load_default
    from .pipelines import STNAlignmentPipeline

    if name_or_path is None:
        return load_default(device)
    if not Path(name_or_path).exists() and name_or_path.count("/") != 1:
        raise FileNotFoundError(f"expected --pipeline to be a saved pipeline folder or a hub id, got {name_or_path!r}")
    return STNAlignmentPipeline.from_pretrained(name_or_path).to(device)


def _write_text(path: str, text: str) -> None:
    """Write a report file, creating its folder, and say where it went."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(f"wrote {path}")


def _theta_report(theta: torch.Tensor, height: int, width: int) -> dict:
    pixel = geometry.theta_to_pixel_matrix(theta.double(), height, width)[0]
    return {
        "theta": theta[0].tolist(),
        "pixel_matrix": pixel.tolist(),
        "image_size": [height, width],
        "convention": "theta maps output (aligned) normalised coords to input coords, align_corners=False; "
        "pixel_matrix maps output pixels to input pixels (cv2.warpAffine with WARP_INVERSE_MAP)",
    }


def run_align(args: argparse.Namespace) -> dict:
    pipe = load_pipeline(args.pipeline, args.device)
    image = load_image(args.image)
    reference = load_image(args.reference) if args.reference else None
    if args.mask is not None:
        return _align_with_mask(args, pipe, image, reference)
    output = pipe(image, reference=reference, min_displacement=args.min_displacement, refine=args.refine)
    aligned = output.images[0] if args.decoded else output.warped_images[0]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    aligned.save(args.output)
    report = _theta_report(output.theta, image.height, image.width)
    report["unwarped"] = bool(output.unwarped[0])
    if output.refined is not None:
        report["refined"] = bool(output.refined[0])
        if not report["refined"]:
            print(f"{args.refine} refinement did not converge: kept the STN's θ")
    print("theta (normalised, (2, 3)):")
    for row in report["theta"]:
        print("  " + "  ".join(f"{v:+.6f}" for v in row))
    print(f"pixel matrix ({image.width}×{image.height}, output → input):")
    for row in report["pixel_matrix"]:
        print("  " + "  ".join(f"{v:+.4f}" for v in row))
    print(f"wrote {args.output}")
    if args.json:
        _write_text(args.json, json.dumps(report, indent=2))
    return report


def _add_align(subparsers) -> None:
    parser = subparsers.add_parser("align", help="align an image onto a reference and write it")
    parser.add_argument("--pipeline", default=None, help="saved STNAlignmentPipeline folder or hub id (default: the embedded one)")
    parser.add_argument("--image", required=True, help="the moving image")
    parser.add_argument("--reference", default=None, help="the reference image")
    parser.add_argument("--output", required=True, help="where to write the aligned image")
    parser.add_argument("--json", default=None, help="also write θ and its pixel matrix as JSON here")
    parser.add_argument("--decoded", action="store_true", help="write the VAE-decoded image instead of the pixel warp")
    parser.add_argument("--min-displacement", type=float, default=0.0, help="pixels; below it the image is not warped")
    parser.add_argument("--refine", default=None, choices=("ecc",), help="refine θ with OpenCV ECC from the STN's estimate")
    parser.add_argument("--mask", default=None, help="inpainting mask (white = repaint) to align with the image")
    parser.add_argument("--mask-frame", default="reference", choices=("reference", "image"), help="the frame the mask was drawn on")
    parser.add_argument("--output-mask", default=None, help="where to write the aligned mask (with --mask)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_align)


def _align_with_mask(args: argparse.Namespace, pipe, image, reference) -> dict:
    """``align --mask``: write the image and mask aligned into the reference frame, for any inpainting tool."""
    from .images import tensor_to_pil
    from .inpainting import load_mask, mask_to_pil, prepare_inpainting_inputs

    if reference is None or args.output_mask is None or args.decoded:
        raise ValueError("expected --reference and --output-mask, and no --decoded, with --mask: both are pixel-warped into the reference frame")
    align_kwargs = {"min_displacement": args.min_displacement, "refine": args.refine}
    inputs = prepare_inpainting_inputs(pipe, image, load_mask(args.mask), reference, mask_frame=args.mask_frame, align_kwargs=align_kwargs)
    for path, picture in ((args.output, tensor_to_pil(inputs.image[0])), (args.output_mask, mask_to_pil(inputs.mask_image[0]))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        picture.save(path)
    report = _theta_report(inputs.theta, image.height, image.width)
    report["masked_fraction"] = float(inputs.mask_image[0].mean())
    print(f"wrote {args.output} and {args.output_mask} ({report['masked_fraction']:.1%} to repaint, reference frame)")
    if args.json:
        _write_text(args.json, json.dumps(report, indent=2))
    return report


def run_demo(args: argparse.Namespace) -> dict:
    from .demo import run_demo as demo

    pipe = load_pipeline(args.pipeline, args.device)
    summary = demo(args.output, pipe)
    output = Path(args.output)
    print((output / "results.md").read_text())
    print(f"wrote {output / 'grid.png'}, {output / 'results.md'}, {output / 'results.json'} and {output / 'aligned'}/")
    return summary


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="align bundled photo pairs and write a grid and a table")
    parser.add_argument("--output", default="stn-diffusers-demo", help="folder for the results")
    parser.add_argument("--pipeline", default=None, help="saved STNAlignmentPipeline folder (default: the embedded one)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_demo)


def run_analyze(args: argparse.Namespace) -> dict:
    from .analysis import analyze, folder_photos

    pipe = load_pipeline(args.pipeline, args.device)
    sources, names = folder_photos(args.data) if args.data else (None, None)
    report = analyze(
        pipe, args.output, sources, names, num_pairs=args.num_pairs, warp=args.warp, seed=args.seed,
        num_visual=args.num_visual, pipeline_dir=args.pipeline,
    )  # fmt: skip
    output = Path(args.output)
    print((output / "report.md").read_text())
    print(f"wrote {output / 'report.md'}, {output / 'report.json'} and {len(report['figures'])} figures to {output}/")
    return report


def _add_analyze(subparsers) -> None:
    from .analysis import DEFAULT_NUM_PAIRS, DEFAULT_NUM_VISUAL

    parser = subparsers.add_parser("analyze", help="layer shapes, identity check, gradient flow, θ statistics, figures")
    parser.add_argument("--pipeline", default=None, help="saved STNAlignmentPipeline folder (default: the embedded one)")
    parser.add_argument("--data", default=None, help="folder of photos to cut seeded pairs from (default: the bundled photos)")
    parser.add_argument("--num-pairs", type=int, default=DEFAULT_NUM_PAIRS, help="seeded pairs to measure on")
    parser.add_argument("--warp", default="standard", choices=tuple(geometry.WARP_PRESETS), help="misalignment of the pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    parser.add_argument("--num-visual", type=int, default=DEFAULT_NUM_VISUAL, help="pairs shown in the grid")
    parser.add_argument("--output", required=True, help="folder for report.md, report.json and the figures")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_analyze)


def _named_pipelines(specs: list[str] | None, device: str) -> dict:
    """``["tuned=DIR", "DIR"]`` → ``{name: pipeline}``; the embedded default as ``"stn"`` when none is given."""
    if not specs:
        return {"stn": load_pipeline(None, device)}
    pipelines = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or ("stn" if len(specs) == 1 else Path(path).name)
        if name in pipelines:
            raise ValueError(f"expected distinct pipeline names, got {name!r} twice (use --pipeline NAME=DIR)")
        pipelines[name] = load_pipeline(path, device)
    return pipelines


def run_evaluate(args: argparse.Namespace) -> dict:
    from .evaluation import evaluate, load_photos, markdown_table, parse_methods

    methods = parse_methods(args.methods)
    uses_stn = any(m in ("stn", "stn+ecc") for m in methods)
    pipelines = _named_pipelines(args.pipeline, args.device) if uses_stn else {}
    sources, names = load_photos(args.data)
    report = evaluate(
        pipelines, sources, names=names, num_pairs=args.num_pairs, resolution=args.resolution, seed=args.seed,
        warp=args.warp, photometric=args.photometric, methods=methods, kornia_budget=args.kornia_budget,
    )  # fmt: skip
    table = markdown_table(report)
    print(table)
    if args.json:
        _write_text(args.json, json.dumps(report, indent=2))
    if args.markdown:
        _write_text(args.markdown, table + "\n")
    return report


def _add_evaluate(subparsers) -> None:
    from .evaluation import DEFAULT_METHODS

    parser = subparsers.add_parser("evaluate", help="benchmark STN pipelines against ECC, SIFT, ORB, phase correlation, kornia")
    parser.add_argument(
        "--pipeline", action="append", default=None, metavar="[NAME=]DIR",
        help="saved STNAlignmentPipeline folder, repeatable as NAME=DIR (default: the embedded one)",
    )  # fmt: skip
    parser.add_argument("--data", required=True, help="folder of photos the pipelines never trained on")
    parser.add_argument("--num-pairs", type=int, default=24, help="seeded pairs (cycling over the photos)")
    parser.add_argument("--resolution", type=int, default=512, help="pixel side of the square pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    parser.add_argument("--warp", default="standard", choices=("small", "standard", "large"), help="misalignment of the pairs")
    parser.add_argument("--photometric", default="none", choices=("none", "realistic"), help="photometric change of the moving image")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods to run")
    parser.add_argument("--kornia-budget", type=float, default=600.0, help="seconds kornia may take over all pairs")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table as markdown here")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stn-diffusers", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_align(subparsers)
    _add_demo(subparsers)
    _add_analyze(subparsers)
    _add_evaluate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
