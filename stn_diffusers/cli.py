"""The ``stn-diffusers`` command line: thin parsers over library functions.

    stn-diffusers align --pipeline DIR --image moving.jpg --reference reference.jpg --output aligned.png
    stn-diffusers align --pipeline DIR --pairs pairs.csv --output-dir aligned      # many pairs, see batch_align

Every verb checks its device, inputs and outputs before it computes anything, and writes its
outputs only once all are computed, all or none (:func:`stn_diffusers.files.write_outputs`), so that
a failure leaves no half-written file and no half set. A user's mistake (a missing or corrupt file,
a device torch cannot use, an output that cannot be written or would replace an input) is reported
as one ``error: ...`` line with exit status 2; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import batch_align, data, files, geometry, refine
from .confidence import DEFAULT_CONFIDENCE_THRESHOLD
from .errors import USER_ERROR_EXIT_CODE, run_reporting_errors
from .images import load_image, mask_to_pil, open_image

# The files of a saved pipeline folder that loading reads (diffusers' names).
MODEL_INDEX = "model_index.json"
COMPONENT_CONFIG = "config.json"
COMPONENT_WEIGHTS = "diffusion_pytorch_model.safetensors"
DEBUG_HELP = "on an error, print the traceback as well as the one-line message"
# Exit status of `align --fail-below X` when the alignment's confidence is below X (2 is a user's mistake).
LOW_CONFIDENCE_EXIT_CODE = 3


# ------------------------------------------------------------------------------------------ inputs
def check_device(name: str) -> torch.device:
    """``--device`` as a ``torch.device`` that torch can use on this machine.

    Raises ``ValueError`` naming the devices it can use when ``name`` is misspelt, or names a device
    that is absent (``cuda`` with no GPU, ``cuda:3`` on a one-GPU machine) or not built into torch.
    """
    try:
        device = torch.device(name)
        torch.empty(1, device=device)  # the one test that covers every backend: use it once
    except (RuntimeError, AssertionError) as error:  # torch built without CUDA raises AssertionError
        raise ValueError(
            f"expected --device to be a device torch can use here ({', '.join(_usable_devices())}), got {name!r}"
        ) from error
    return device


def _usable_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Check a saved pipeline folder before loading it, naming the first file that is missing or
    unreadable: ``model_index.json``, then each component's ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` (a truncated or corrupt safetensors file included)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    if not index_path.is_file():
        raise FileNotFoundError(
            f"expected --pipeline to be a saved pipeline folder, a hub id or an embedded pipeline's name "
            f"(fast, accurate), got {str(folder)!r}, which has no {MODEL_INDEX}"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except ValueError as error:  # not JSON, or not text
        raise ValueError(f"expected JSON in {str(index_path)!r}: {error}") from error
    # Entries such as "_class_name" are metadata; a component is ["library", "ClassName"].
    components = [name for name, entry in index.items() if not name.startswith("_") and isinstance(entry, list)]
    for component in components:
        for file in (COMPONENT_CONFIG, COMPONENT_WEIGHTS):
            path = folder / component / file
            if not path.is_file():
                raise FileNotFoundError(f"expected {str(path)!r} (the {component!r} component), found none")
        weights = folder / component / COMPONENT_WEIGHTS
        try:
            with safe_open(weights, framework="pt"):  # reads the header and checks the file covers it
                pass
        except SafetensorError as error:
            raise ValueError(
                f"expected a complete safetensors file at {str(weights)!r} (truncated or corrupt?): {error}"
            ) from error


def load_pipeline(name_or_path: str | None, device: str | torch.device = "cpu"):
    """An ``STNAlignmentPipeline`` from a folder or hub id; the embedded default when ``None``, and
    an embedded pipeline by its name (``fast``, ``accurate``) unless a folder of that name exists.

    A local folder is checked first (:func:`check_pipeline_folder`) and only safetensors weights are read.
    """
    from .default import load_default
    from .pipelines import STNAlignmentPipeline

    if name_or_path is None:
        return load_default(device)
    if _is_embedded_name(name_or_path):
        return load_default(device, variant=name_or_path)
    if not _is_hub_id(name_or_path):
        check_pipeline_folder(name_or_path)
    return STNAlignmentPipeline.from_pretrained(name_or_path, use_safetensors=True).to(device)


def add_pipeline_argument(parser: argparse.ArgumentParser) -> None:
    """``--pipeline``, read by :func:`load_pipeline`: a folder, a hub id or an embedded pipeline's name."""
    parser.add_argument(
        "--pipeline", default=None, help="saved pipeline folder, hub id, or an embedded one: fast (default), accurate"
    )


def _is_embedded_name(name_or_path: str) -> bool:
    """An embedded pipeline's name (``fast``, ``accurate``) with no local folder of that name."""
    from .default import EMBEDDED_PIPELINES

    return name_or_path in EMBEDDED_PIPELINES and not os.path.exists(name_or_path)


def _is_hub_id(name_or_path: str) -> bool:
    """``"owner/name"`` with no such local folder is a Hugging Face Hub id; anything else is a folder."""
    return not Path(name_or_path).exists() and name_or_path.count("/") == 1


def _theta_report(theta: torch.Tensor, height: int, width: int) -> dict:
    return {**batch_align.theta_report(theta, height, width), "convention": batch_align.THETA_CONVENTION}


def run_align(args: argparse.Namespace) -> dict:
    if args.image is None:
        return run_align_pairs(args)
    # 1. Check the device, inputs and outputs before anything is computed
    device = check_device(args.device)
    _check_single_pair_flags(args)
    _check_mask_flags(args)
    if args.fail_below is not None and args.mask is not None:
        raise ValueError("expected --fail-below without --mask: the confidence is reported for the plain alignment")
    image = load_image(args.image)
    reference = load_image(args.reference) if args.reference else None
    mask = None
    if args.mask is not None:
        from .inpainting import load_mask  # lazily: it imports Stable Diffusion's inpainting parts

        mask = load_mask(args.mask)
    # Upright and in its own mode: the pipeline applies the mask value rules (white = ignore).
    ignore_mask = open_image(args.ignore_mask, "ignore mask") if args.ignore_mask is not None else None
    if ignore_mask is not None and ignore_mask.size != reference.size:
        raise ValueError(
            f"expected --ignore-mask of the reference's size, {reference.width}×{reference.height} (it marks "
            f"pixels of the reference), got {ignore_mask.width}×{ignore_mask.height}"
        )
    files.check_outputs(
        {"--output": args.output, "--output-mask": args.output_mask, "--json": args.json},
        inputs={
            "--image": args.image,
            "--reference": args.reference,
            "--mask": args.mask,
            "--ignore-mask": args.ignore_mask,
        },  # fmt: skip
        images=("--output", "--output-mask"),
        overwrite=args.overwrite,
        overwrite_label="--overwrite",
    )

    # 2. Align
    pipe = load_pipeline(args.pipeline, device)
    if mask is not None:
        pictures, report = _align_with_mask(args, pipe, image, mask, reference, ignore_mask)
    else:
        pictures, report = _align_image(args, pipe, image, reference, ignore_mask)

    # 3. Write every output at once
    writers = {path: files.image_writer(picture, path) for path, picture in pictures.items()}
    if args.json:
        writers[args.json] = files.text_writer(json.dumps(report, indent=2))
    files.write_outputs(writers)
    if mask is not None:
        repaint = report["masked_fraction"]
        print(f"wrote {args.output} and {args.output_mask} ({repaint:.1%} to repaint, reference frame)")
    else:
        print(f"wrote {args.output}")
    if args.json:
        print(f"wrote {args.json}")
    return report


def _align_image(args: argparse.Namespace, pipe, image, reference, ignore_mask) -> tuple[dict, dict]:
    """``align``: the aligned image (``{path: picture}``) and the θ report, printed."""
    # Without --decoded only the pixel warp is written: the VAE decoder never runs.
    output = pipe(
        image, reference=reference, min_displacement=args.min_displacement, refine=args.refine, decode=args.decoded,
        ignore_mask=ignore_mask,
    )  # fmt: skip
    aligned = output.images[0] if args.decoded else output.warped_images[0]
    report = _theta_report(output.theta, image.height, image.width)
    report["unwarped"] = bool(output.unwarped[0])
    if output.refined is not None:
        report["refined"] = bool(output.refined[0])
        if not report["refined"]:
            print(f"{args.refine} refinement did not converge: kept the STN's θ")
    if output.confidence is not None:
        report["confidence"] = float(output.confidence[0])
        threshold = DEFAULT_CONFIDENCE_THRESHOLD
        print(f"confidence: {report['confidence']:.3f} (below {threshold} the alignment is likely wrong)")
    print(f"theta (normalised, {tuple(output.theta.shape[1:])}):")
    for row in report["theta"]:
        print("  " + "  ".join(f"{v:+.6f}" for v in row))
    print(f"pixel matrix ({image.width}×{image.height}, output → input):")
    for row in report["pixel_matrix"]:
        print("  " + "  ".join(f"{v:+.4f}" for v in row))
    return {args.output: aligned}, report


# Flags of one pair (--image) and of many (--pairs, --image-dir, --dataset), each refused with the other.
SINGLE_PAIR_FLAGS = {
    "--reference": "reference", "--output": "output", "--json": "json", "--mask": "mask",
    "--output-mask": "output_mask", "--mask-frame": "mask_frame", "--ignore-mask": "ignore_mask",
    "--fail-below": "fail_below", "--overwrite": "overwrite",
}  # fmt: skip
MANY_PAIRS_FLAGS = {
    "--output-dir": "output_dir", "--skip-existing": "skip_existing", "--strict": "strict",
    "--reference-dir": "reference_dir", "--image-column": "image_column", "--reference-column": "reference_column",
    "--mask-column": "mask_column", "--split": "split", "--dataset-config": "dataset_config",
    "--batch-size": "batch_size",
}  # fmt: skip


def _given(args: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The flags of ``flags`` (``{flag: attribute}``) given a value other than their default."""
    return [flag for flag, name in flags.items() if getattr(args, name) not in (None, False)]


def _check_single_pair_flags(args: argparse.Namespace) -> None:
    given = _given(args, MANY_PAIRS_FLAGS)
    if args.output is None:
        raise ValueError("expected --output (where to write the aligned image) with --image")
    if given:
        raise ValueError(f"expected {', '.join(given)} only with --pairs, --image-dir or --dataset, got --image")


def _pair_list(args: argparse.Namespace) -> batch_align.PairList:
    """The pairs named by ``--pairs``, ``--image-dir``/``--reference-dir`` or ``--dataset`` and its columns."""
    source = "--pairs" if args.pairs else "--image-dir" if args.image_dir else "--dataset"
    wrong = [
        flag for flag, needs in (("--reference-dir", "--image-dir"), ("--image-column", "--dataset"),
                                 ("--reference-column", "--dataset"), ("--mask-column", "--dataset"),
                                 ("--split", "--dataset"), ("--dataset-config", "--dataset"))
        if flag in _given(args, MANY_PAIRS_FLAGS) and needs != source
    ]  # fmt: skip
    if wrong:
        raise ValueError(f"expected {', '.join(wrong)} only with the input it belongs to, got {source}")
    if args.pairs:
        return batch_align.pairs_from_csv(args.pairs)
    if args.image_dir:
        if args.reference_dir is None:
            raise ValueError("expected --reference-dir with --image-dir: the references, matched by file name")
        return batch_align.pairs_from_folders(args.image_dir, args.reference_dir)
    if args.image_column is None or args.reference_column is None:
        raise ValueError("expected --image-column and --reference-column with --dataset: the columns of each pair")
    return batch_align.pairs_from_dataset(
        args.dataset, args.image_column, args.reference_column, args.mask_column, args.dataset_config,
        args.split or data.DEFAULT_SPLIT,
    )  # fmt: skip


def run_align_pairs(args: argparse.Namespace) -> dict:
    """``align --pairs / --image-dir / --dataset``: a thin layer over :func:`batch_align.align_pairs`;
    every process of a launched run (accelerate, torchrun) runs it, the main one prints the summary."""
    # 1. Check the device, the flags, the pairs and the output folder before anything is computed
    device = check_device(args.device)
    given = _given(args, SINGLE_PAIR_FLAGS)
    if given:
        raise ValueError(f"expected {', '.join(given)} only with --image (one pair), got many pairs")
    if args.output_dir is None:
        raise ValueError("expected --output-dir (the folder for the aligned images and results.jsonl) with many pairs")
    pairs = _pair_list(args)
    batch_align.check_output_dir(pairs, args.output_dir, args.skip_existing, label="--output-dir")
    state, device = batch_align.launch_state(device)

    # 2. Align, each process its share
    pipe = load_pipeline(args.pipeline, device)
    summary = batch_align.align_pairs(
        pipe, pairs, args.output_dir, batch_size=args.batch_size or batch_align.DEFAULT_BATCH_SIZE,
        skip_existing=args.skip_existing, strict=args.strict, min_displacement=args.min_displacement,
        refine=args.refine, decoded=args.decoded, state=state,
    )  # fmt: skip
    if summary is None:  # not the main process
        return {}
    print(batch_align.summary_text(summary, args.output_dir))
    return summary


def _add_align(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "align", parents=[common], help="align an image onto a reference, or many pairs, and write them"
    )
    add_pipeline_argument(parser)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", default=None, help="the moving image (one pair; with --output)")
    inputs.add_argument(
        "--pairs", default=None, metavar="CSV",
        help="many pairs: a CSV with the columns image,reference[,mask] (paths relative to its folder; mask: "
        "reference pixels not to use, white = ignore, at the reference's size)",
    )  # fmt: skip
    inputs.add_argument("--image-dir", default=None, help="many pairs: the moving images (with --reference-dir)")
    inputs.add_argument(
        "--dataset", default=None, metavar="NAME_OR_PATH",
        help="many pairs: a Hugging Face dataset (a save_to_disk folder, an imagefolder folder or a Hub id), "
        "a pair per row (with --image-column and --reference-column)",
    )  # fmt: skip
    parser.add_argument("--reference", default=None, help="the reference image")
    parser.add_argument("--output", default=None, help="where to write the aligned image (with --image)")
    parser.add_argument(
        "--reference-dir", default=None, help="the references, each with the relative path of its image in --image-dir"
    )
    parser.add_argument("--image-column", default=None, help="--dataset's column of moving images")
    parser.add_argument("--reference-column", default=None, help="--dataset's column of references")
    parser.add_argument(
        "--mask-column", default=None, help="--dataset's column of ignore masks (white = reference pixels not to use)"
    )
    parser.add_argument("--split", default=None, help=f"--dataset's split (default: {data.DEFAULT_SPLIT})")
    parser.add_argument("--dataset-config", default=None, help="--dataset's configuration name, where it has several")
    parser.add_argument(
        "--output-dir", default=None,
        help="many pairs: the folder for the aligned images, results.jsonl (one record per pair) and summary.json",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size", type=_integer_at_least(1), default=None,
        help=f"many pairs: pairs read and encoded at once (default: {batch_align.DEFAULT_BATCH_SIZE})",
    )  # fmt: skip
    parser.add_argument(
        "--skip-existing", action="store_true",
        help="many pairs: resume an interrupted run in --output-dir; pairs already recorded are not aligned again",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true",
        help="many pairs: stop at the first pair that fails instead of recording its error and going on",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="also write θ and its pixel matrix as JSON here")
    parser.add_argument("--decoded", action="store_true", help="write the VAE-decoded image instead of the pixel warp")
    parser.add_argument("--min-displacement", type=float, default=0.0, help="pixels; below it the image is not warped")
    parser.add_argument(
        "--refine", default=None, choices=refine.REFINE_METHODS, help="refine θ from the STN's estimate with OpenCV"
    )
    parser.add_argument("--mask", default=None, help="inpainting mask (white = repaint) to align with the image")
    # No argparse choices: they live in the inpainting module, which loads only when --mask is used.
    parser.add_argument(
        "--mask-frame", default=None, help="the frame the mask was drawn on: reference (default) or image"
    )
    parser.add_argument("--output-mask", default=None, help="where to write the aligned mask (with --mask)")
    parser.add_argument(
        "--ignore-mask", default=None, metavar="FILE",
        help="reference pixels not to use for estimating the motion (white = ignore), at the reference's size; "
        "with --mask, replaces the default (a mask drawn on the reference is ignored)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="let an output replace an input file (--image, --reference, --mask)"
    )
    parser.add_argument(
        "--fail-below", type=_unit_interval, default=None, metavar="X",
        help=f"exit with status {LOW_CONFIDENCE_EXIT_CODE} (outputs still written) when the alignment's confidence "
        f"is below X in [0, 1] (the documented threshold is {DEFAULT_CONFIDENCE_THRESHOLD})",
    )  # fmt: skip
    parser.set_defaults(func=run_align)


def run_realign(args: argparse.Namespace) -> dict:
    from .realign import realign_edit

    # 1. Check the device, inputs and outputs before anything is computed
    device = check_device(args.device)
    edited, original = load_image(args.edited), load_image(args.original)
    edit_mask = open_image(args.edit_mask, "edit mask") if args.edit_mask is not None else None
    if edit_mask is not None and edit_mask.size != original.size:
        raise ValueError(
            f"expected --edit-mask of the original's size, {original.width}×{original.height} (it marks pixels "
            f"of the original), got {edit_mask.width}×{edit_mask.height}"
        )
    files.check_outputs(
        {"--output": args.output, "--output-mask": args.output_mask, "--json": args.json},
        inputs={"--edited": args.edited, "--original": args.original, "--edit-mask": args.edit_mask},
        images=("--output", "--output-mask"),
        overwrite=args.overwrite,
        overwrite_label="--overwrite",
    )

    # 2. Re-align
    pipe = load_pipeline(args.pipeline, device)
    out = realign_edit(
        edited, original, edit_mask, pipeline=pipe, paste_back=args.paste_back,
        refine=None if args.no_refine else "ecc", feather=args.feather,
    )  # fmt: skip
    report = _theta_report(out.theta, original.height, original.width)
    report.update(refined=out.refined, confidence=out.confidence, paste_back=args.paste_back)
    report["edited_fraction"] = float((out.edit_mask >= 0.5).float().mean())

    # 3. Write every output at once
    writers = {args.output: files.image_writer(out.image, args.output)}
    if args.output_mask:
        writers[args.output_mask] = files.image_writer(mask_to_pil(out.edit_mask), args.output_mask)
    if args.json:
        writers[args.json] = files.text_writer(json.dumps(report, indent=2))
    files.write_outputs(writers)
    if out.confidence is not None:
        print(f"confidence: {out.confidence:.3f} (below {DEFAULT_CONFIDENCE_THRESHOLD} the alignment is likely wrong)")
    what = "the original with the re-aligned edit pasted in" if args.paste_back else "the re-aligned edit"
    print(f"wrote {args.output} ({what}; edited region {report['edited_fraction']:.1%} of the original)")
    for path in writers:
        if path != args.output:
            print(f"wrote {path}")
    return report


def _add_realign(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "realign", parents=[common], help="warp an image-editing model's output back onto its input"
    )
    add_pipeline_argument(parser)
    parser.add_argument("--edited", required=True, help="the edit model's output")
    parser.add_argument("--original", required=True, help="the image the edit was made from")
    parser.add_argument("--output", required=True, help="where to write the re-aligned image")
    parser.add_argument(
        "--edit-mask", default=None, metavar="FILE",
        help="the edited region on the original (white = edited), at its size; default: found from the difference",
    )  # fmt: skip
    parser.add_argument(
        "--paste-back", action="store_true",
        help="write the original outside the edited region and the re-aligned edit inside it",
    )  # fmt: skip
    parser.add_argument(
        "--feather", type=float, default=None, metavar="PX",
        help="the seam's blur in pixels (default: 1 %% of the shorter side)",
    )  # fmt: skip
    parser.add_argument("--no-refine", action="store_true", help="the STN's θ alone, without ECC on the pixels")
    parser.add_argument("--output-mask", default=None, help="also write the edited region used for the blend")
    parser.add_argument("--json", default=None, help="also write θ, its pixel matrix and the confidence as JSON")
    parser.add_argument("--overwrite", action="store_true", help="let an output replace an input file")
    parser.set_defaults(func=run_realign)


def _check_mask_flags(args: argparse.Namespace) -> None:
    """``align --mask`` needs ``--reference`` and ``--output-mask`` and no ``--decoded``; the other mask
    flags need ``--mask``; ``--ignore-mask`` (drawn on the reference) needs ``--reference``."""
    if args.ignore_mask is not None and args.reference is None:
        raise ValueError("expected --reference with --ignore-mask: the mask marks pixels of the reference")
    if args.mask is None:
        mask_flags = (("--output-mask", args.output_mask), ("--mask-frame", args.mask_frame))
        given = [flag for flag, value in mask_flags if value is not None]
        if given:
            raise ValueError(f"expected --mask with {' and '.join(given)}, got no --mask")
        return
    from .inpainting import MASK_FRAMES

    if args.reference is None or args.output_mask is None or args.decoded:
        raise ValueError(
            "expected --reference and --output-mask, and no --decoded, with --mask: "
            "both are pixel-warped into the reference frame"
        )
    if args.mask_frame is not None and args.mask_frame not in MASK_FRAMES:
        raise ValueError(f"expected --mask-frame in {MASK_FRAMES}, got {args.mask_frame!r}")


def _align_with_mask(args: argparse.Namespace, pipe, image, mask, reference, ignore_mask) -> tuple[dict, dict]:
    """``align --mask``: the image and mask aligned into the reference frame (``{path: picture}``), for any
    inpainting tool, and the θ report."""
    from .images import tensor_to_pil
    from .inpainting import prepare_inpainting_inputs

    align_kwargs = {"min_displacement": args.min_displacement, "refine": args.refine}
    # Flags not given leave the library's defaults (the mask frame; which pixels the alignment ignores).
    given = {"mask_frame": args.mask_frame, "ignore_mask": ignore_mask}
    options = {name: value for name, value in given.items() if value is not None}
    inputs = prepare_inpainting_inputs(pipe, image, mask, reference, align_kwargs=align_kwargs, **options)
    report = _theta_report(inputs.theta, image.height, image.width)
    report["masked_fraction"] = float(inputs.mask_image[0].mean())
    pictures = {args.output: tensor_to_pil(inputs.image[0]), args.output_mask: mask_to_pil(inputs.mask_image[0])}
    return pictures, report


def run_demo(args: argparse.Namespace) -> dict:
    from .demo import ALIGNED_FOLDER, GRID_FILE, RESULTS_JSON, RESULTS_MARKDOWN
    from .demo import run_demo as demo

    device = check_device(args.device)
    files.check_output_folder(args.output, "--output")
    pipe = load_pipeline(args.pipeline, device)
    summary = demo(args.output, pipe)
    output = Path(args.output)
    print((output / RESULTS_MARKDOWN).read_text(encoding="utf-8"))
    written = ", ".join(str(output / name) for name in (GRID_FILE, RESULTS_MARKDOWN, RESULTS_JSON))
    print(f"wrote {written} and {output / ALIGNED_FOLDER}/")
    return summary


def _add_demo(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "demo", parents=[common], help="align bundled photo pairs and write a grid and a table"
    )
    parser.add_argument("--output", default="stn-diffusers-demo", help="folder for the results")
    add_pipeline_argument(parser)
    parser.set_defaults(func=run_demo)


def run_analyze(args: argparse.Namespace) -> dict:
    from .analysis import REPORT_JSON, REPORT_MARKDOWN, analyze

    device = check_device(args.device)
    # Without --data, analyze cuts its pairs from the bundled photos.
    sources, names = None, None
    if args.data:
        sources, paths = data.load_photo_folder(args.data)
        names = [path.name for path in paths]
    files.check_output_folder(args.output, "--output")
    pipe = load_pipeline(args.pipeline, device)
    report = analyze(
        pipe, args.output, sources, names, num_pairs=args.num_pairs, warp=args.warp, seed=args.seed,
        num_visual=args.num_visual, pipeline_dir=args.pipeline,
    )  # fmt: skip
    output = Path(args.output)
    print((output / REPORT_MARKDOWN).read_text(encoding="utf-8"))
    print(f"wrote {output / REPORT_MARKDOWN}, {output / REPORT_JSON} and {len(report['figures'])} figures to {output}/")
    return report


def _add_analyze(subparsers, common: argparse.ArgumentParser) -> None:
    from .analysis import DEFAULT_NUM_PAIRS, DEFAULT_NUM_VISUAL

    parser = subparsers.add_parser(
        "analyze", parents=[common], help="layer shapes, identity check, gradient flow, θ statistics, figures"
    )
    add_pipeline_argument(parser)
    parser.add_argument(
        "--data", default=None, help="folder of photos to cut seeded pairs from (default: the bundled photos)"
    )
    parser.add_argument(
        "--num-pairs", type=_integer_at_least(1), default=DEFAULT_NUM_PAIRS, help="seeded pairs to measure on"
    )
    parser.add_argument(
        "--warp", default="standard", choices=tuple(geometry.WARP_PRESETS), help="misalignment of the pairs"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    parser.add_argument(
        "--num-visual", type=_integer_at_least(0), default=DEFAULT_NUM_VISUAL, help="pairs shown in the grid"
    )
    parser.add_argument("--output", required=True, help="folder for report.md, report.json and the figures")
    parser.set_defaults(func=run_analyze)


def _pipeline_specs(specs: list[str]) -> dict[str, str]:
    """``["tuned=DIR", "DIR"]`` → ``{name: DIR}``; a lone unnamed pipeline is ``"stn"``, other unnamed
    ones take their folder's name."""
    folders: dict[str, str] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or ("stn" if len(specs) == 1 else Path(path).name)
        if name in folders:
            raise ValueError(f"expected distinct pipeline names, got {name!r} twice (use --pipeline NAME=DIR)")
        folders[name] = path
    return folders


def _named_pipelines(specs: list[str] | None, device: torch.device) -> dict:
    """``--pipeline`` values → ``{name: pipeline}``; the embedded default as ``"stn"`` when none is given.
    Every folder is checked before any is loaded."""
    if not specs:
        return {"stn": load_pipeline(None, device)}
    folders = _pipeline_specs(specs)
    for path in folders.values():
        if not (_is_hub_id(path) or _is_embedded_name(path)):
            check_pipeline_folder(path)  # a mistake in the last folder is reported before the first loads
    return {name: load_pipeline(path, device) for name, path in folders.items()}


def run_evaluate(args: argparse.Namespace) -> dict:
    from .evaluation import STN_METHODS, evaluate, markdown_table, parse_methods

    # 1. Check the device, the flags, the photos and the outputs before anything is computed
    device = check_device(args.device)
    methods = parse_methods(args.methods)
    files.check_outputs({"--json": args.json, "--markdown": args.markdown})
    sources, names, _ = data.load_photos(
        args.data, args.dataset_name, args.image_column, args.dataset_config_name, args.dataset_split
    )

    # 2. Evaluate: one report per warp, on the same photos and pipelines
    uses_stn = any(m in STN_METHODS for m in methods)
    pipelines = _named_pipelines(args.pipeline, device) if uses_stn else {}
    reports = []
    for warp in args.warp:
        report = evaluate(
            pipelines, sources, names=names, num_pairs=args.num_pairs,
            resolution=args.resolution, seed=args.seed, warp=warp, photometric=args.photometric,
            methods=methods, kornia_budget=args.kornia_budget, local_change=args.local_change,
        )  # fmt: skip
        reports.append(report)
        print(markdown_table(report) + "\n")
    table = "\n\n".join(markdown_table(report) for report in reports)

    # 3. Write every output at once: one report as an object, several as a list
    writers = {}
    if args.json:
        writers[args.json] = files.text_writer(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    if args.markdown:
        writers[args.markdown] = files.text_writer(table + "\n")
    files.write_outputs(writers)
    for path in writers:
        print(f"wrote {path}")
    return reports[0] if len(reports) == 1 else {"reports": reports}


def _warp_list(value: str) -> tuple[str, ...]:
    """``--warp standard,large,none`` → the presets in order; an unknown one is a usage error naming the choices."""
    warps = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [warp for warp in warps if warp not in geometry.WARP_PRESETS]
    if not warps or unknown:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated presets from {', '.join(geometry.WARP_PRESETS)}, got {value!r}"
        )
    return warps


# The standard report: the training range, the wide basin, and pairs that are already aligned.
DEFAULT_EVALUATION_WARPS = "standard,large,none"


def _add_evaluate(subparsers, common: argparse.ArgumentParser) -> None:
    from .evaluation import DEFAULT_METHODS, DEFAULT_NUM_PAIRS

    parser = subparsers.add_parser(
        "evaluate", parents=[common], help="benchmark STN pipelines against ECC, SIFT, ORB, phase correlation, kornia"
    )
    parser.add_argument(
        "--pipeline", action="append", default=None, metavar="[NAME=]DIR",
        help="saved STNAlignmentPipeline folder, hub id or embedded one (fast, accurate), repeatable as NAME=DIR "
        "(default: the embedded fast one)",
    )  # fmt: skip
    photos = parser.add_mutually_exclusive_group(required=True)
    photos.add_argument("--data", default=None, help="folder of photos the pipelines never trained on")
    # diffusers' flag names, and the spelling of this command line's other flags
    photos.add_argument(
        "--dataset_name", "--dataset-name", default=None, metavar="NAME_OR_PATH",
        help="or a Hugging Face dataset of such photos: a save_to_disk folder, an imagefolder folder or a Hub id",
    )  # fmt: skip
    parser.add_argument(
        "--dataset_config_name", "--dataset-config-name", default=None,
        help="the dataset's configuration name, where it has several",
    )  # fmt: skip
    parser.add_argument(
        "--image_column", "--image-column", default=data.DEFAULT_IMAGE_COLUMN,
        help="the dataset's column of photos (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--dataset_split", "--dataset-split", default=data.DEFAULT_SPLIT,
        help="the dataset's split (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--num-pairs",
        type=_integer_at_least(1),
        default=DEFAULT_NUM_PAIRS,
        help="seeded pairs (cycling over the photos)",
    )
    parser.add_argument("--resolution", type=_integer_at_least(1), default=512, help="pixel side of the square pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairs")
    # "none" too: zero-motion pairs (with --local-change) measure the false motion a local change causes.
    parser.add_argument(
        "--warp", default=DEFAULT_EVALUATION_WARPS, type=_warp_list, metavar="PRESET[,PRESET...]",
        help=f"misalignment of the pairs, one report per preset (from {', '.join(geometry.WARP_PRESETS)}; "
        "default: %(default)s: the training range, large warps, and aligned pairs)",
    )  # fmt: skip
    parser.add_argument(
        "--local-change", type=_fraction_below_one, default=0.0, metavar="FRACTION",
        help="share of each moving image replaced by other content (a pasted patch, an edit), in [0, 1)",
    )  # fmt: skip
    parser.add_argument(
        "--photometric", default="none", choices=data.PHOTOMETRIC_MODES, help="photometric change of the moving image"
    )
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods to run")
    parser.add_argument("--kornia-budget", type=float, default=600.0, help="seconds kornia may take over all pairs")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table as markdown here")
    parser.set_defaults(func=run_evaluate)


# ------------------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other user error: one ``error:`` line, status 2."""

    def error(self, message: str):
        self.exit(USER_ERROR_EXIT_CODE, f"error: {message} (see {self.prog} --help)\n")


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for an integer flag that must be ``>= minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _fraction_type(include_one: bool):
    """An argparse ``type`` for a number in ``[0, 1]`` (``include_one``) or ``[0, 1)``."""
    interval = "[0, 1]" if include_one else "[0, 1)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not (0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    return parse


_fraction_below_one = _fraction_type(include_one=False)
_unit_interval = _fraction_type(include_one=True)


def _common_options() -> argparse.ArgumentParser:
    """The flags every verb takes."""
    common = _Parser(add_help=False)
    common.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, mps…)")
    common.add_argument(
        "--threads", type=_integer_at_least(1), default=None,
        help="CPU threads torch may use (default: torch's own choice, one per core)",
    )  # fmt: skip
    # SUPPRESS: after the verb, --debug must not reset the value given before it.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stn-diffusers", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    common = _common_options()
    _add_align(subparsers, common)
    _add_realign(subparsers, common)
    _add_demo(subparsers, common)
    _add_analyze(subparsers, common)
    _add_evaluate(subparsers, common)
    _add_app(subparsers, common)
    return parser


def _add_app(subparsers, common: argparse.ArgumentParser) -> None:
    # The app's flags and runner live in stn_diffusers.app; importing it does not import gradio.
    from .app import add_app_arguments, run_app

    parser = subparsers.add_parser(
        "app", parents=[common], help="serve a web demo: upload two images, see and download the alignment"
    )
    add_app_arguments(parser)
    parser.set_defaults(func=run_app)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (0, or 2 after a one-line ``error:`` for a user's mistake).

    ``--threads`` sets torch's CPU threads for the command only, and only when given; the previous
    count is restored after, so a Python caller's process is left as it was.
    """
    args = build_parser().parse_args(argv)
    if args.threads is None:
        return _run(args)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace) -> int:
    """The command's exit status: a user's mistake (2), an alignment below ``--fail-below`` (3), or 0."""
    reports = []
    status = run_reporting_errors(lambda: reports.append(args.func(args)), debug=args.debug)
    fail_below = getattr(args, "fail_below", None)
    confidence = reports[0].get("confidence") if status == 0 and isinstance(reports[0], dict) else None
    if fail_below is not None and confidence is not None and confidence < fail_below:
        print(f"error: confidence {confidence:.3f} is below --fail-below {fail_below}", file=sys.stderr)
        return LOW_CONFIDENCE_EXIT_CODE
    return status


if __name__ == "__main__":
    sys.exit(main())
