"""``stn-diffusers app``: a web demo (Gradio) that aligns an uploaded image onto a reference.

    pip install "stn-diffusers[app]"
    stn-diffusers app                      # http://127.0.0.1:7860, the embedded default pipeline

The page takes a moving image, a reference and an optional ignore mask (white = reference pixels not
to use, as ``align --ignore-mask``), and shows θ and its pixel matrix, the confidence, reference
against moving and against aligned (a 50/50 blend and the absolute difference), and offers the
aligned image and its validity mask as PNG downloads. The work is :func:`align_for_app`, a plain
function that tests call; :func:`build_app` wraps it in a ``gradio.Blocks`` page, and gradio is
imported only there, so ``stn-diffusers --help`` and every other verb run without it.

The page works offline: no analytics, no share link unless ``--share``, fonts served by gradio itself.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
import torch.nn.functional as F

from . import geometry
from .confidence import DEFAULT_CONFIDENCE_THRESHOLD
from .data import ASSETS, REAL_PAIR, make_pair
from .errors import USER_ERRORS
from .images import load_image, mask_to_pil, tensor_to_pil, to_rgb_tensor
from .refine import OPENCV_INSTALL_HINT, REFINE_METHODS, import_cv2

APP_INSTALL_HINT = 'pip install "stn-diffusers[app]"'
DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 serves the local network
TITLE = "stn-diffusers: align an image onto a reference"
# Longer side of the comparison images on the page; the downloads keep the moving image's full size.
DISPLAY_SIDE = 640
# Heights of the image boxes on the page, in CSS pixels: the whole result fits one screen.
INPUT_HEIGHT = 260
OUTPUT_HEIGHT = 240
# Absolute differences of a few per cent are invisible at gain 1; the page shows them three times brighter.
DIFFERENCE_GAIN = 3.0
ALIGNED_FILE = "aligned.png"
VALID_MASK_FILE = "aligned_valid_mask.png"
# Alignment folders kept on disk: gradio copies a download into its own cache as the callback returns,
# so older folders are no longer read and are removed as new ones come.
KEPT_ALIGNMENTS = 4
# gradio's own cache (what it copied to serve) is swept of files older than this, this often (seconds).
CACHE_LIFETIME = 3600

# The first example: a square crop of the astronaut, and the same scene moved by a known
# misalignment (the θ that aligns it back: a similarity about the crop's centre).
EXAMPLE_PHOTO = "astronaut.jpg"
EXAMPLE_SIZE = 384
EXAMPLE_ROTATION_DEGREES = 6.0
EXAMPLE_SCALE = 1.04
EXAMPLE_SHIFT = (0.08, -0.05)  # normalised units: 0.08 is 4 % of the width


def import_gradio():
    """``gradio``, or an ``ImportError`` that names the extra to install."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(
            f"the web demo needs gradio, which is not installed; install it with `{APP_INSTALL_HINT}`"
        ) from error
    return gradio


# --------------------------------------------------------------------------------------- alignment
@dataclass
class AppAlignment:
    """One alignment as the page shows it.

    Args:
        theta: ``(1, 2, 3)`` (or ``(1, 3, 3)`` from a homography STN), see :mod:`stn_diffusers.geometry`.
        pixel_matrix: ``(3, 3)`` float64, θ in pixels of the moving image (output → input, OpenCV's convention).
        aligned: the moving image warped onto the reference at its own full size (no VAE loss).
        valid_mask: ``L`` mode, the aligned image's size: white where its pixels come from inside the
            moving image, black on the border the warp exposes.
        confidence: in ``[0, 1]``; below :data:`DEFAULT_CONFIDENCE_THRESHOLD` the alignment is likely wrong.
        displacement: mean corner motion of θ in pixels of the moving image.
        unwarped: the image came back untouched (θ is the identity).
        refined: with ECC refinement, whether it was accepted; ``None`` without.
        blend_before, blend_after: reference and moving (aligned) image, 50/50, at the display size.
        difference_before, difference_after: ``|reference − moving (aligned)|`` × :data:`DIFFERENCE_GAIN`,
            grey; after: black where the aligned image has no pixels.
        mean_difference_before, mean_difference_after: mean absolute difference in ``[0, 1]``; after:
            over the pixels the aligned image covers.
    """

    theta: torch.Tensor
    pixel_matrix: torch.Tensor
    aligned: PIL.Image.Image
    valid_mask: PIL.Image.Image
    confidence: float | None
    displacement: float
    unwarped: bool
    refined: bool | None
    blend_before: PIL.Image.Image
    blend_after: PIL.Image.Image
    difference_before: PIL.Image.Image
    difference_after: PIL.Image.Image
    mean_difference_before: float
    mean_difference_after: float


def check_app_inputs(image, reference, ignore_mask=None) -> None:
    """``ValueError`` naming what is missing or of the wrong size: both images are needed, and an
    ignore mask is drawn on the reference, so it has the reference's size."""
    missing = [name for name, value in (("a moving image", image), ("a reference image", reference)) if value is None]
    if missing:
        raise ValueError(f"expected {' and '.join(missing)} to align, got none; upload {' and '.join(missing)}")
    if ignore_mask is not None and ignore_mask.size != reference.size:
        raise ValueError(
            f"expected an ignore mask of the reference's size, {reference.width}×{reference.height} (it marks "
            f"pixels of the reference), got {ignore_mask.width}×{ignore_mask.height}"
        )


def _display_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, DISPLAY_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``(C, H, W)`` resized to ``size``; antialiased when shrinking pictures, nearest for masks."""
    if tuple(image.shape[-2:]) == size:
        return image
    if mode == "nearest":
        return F.interpolate(image[None], size=size, mode="nearest")[0]
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def _difference_picture(first: torch.Tensor, second: torch.Tensor) -> PIL.Image.Image:
    """``|first − second|`` of two ``(3, H, W)`` images, averaged over the channels, as a grey picture."""
    difference = (first - second).abs().mean(dim=0, keepdim=True).mul(DIFFERENCE_GAIN).clamp(0, 1)  # (1, H, W)
    return tensor_to_pil(difference.expand(3, -1, -1))


@torch.inference_mode()
def align_for_app(pipeline, image, reference, ignore_mask=None, refine: str | None = None) -> AppAlignment:
    """Align ``image`` onto ``reference`` (PIL images; ``ignore_mask`` an ``L`` image at the reference's
    size, white = ignore) with ``pipeline`` and make everything the page shows.

    Only the pixel warp is computed (``decode=False``): the VAE decoder never runs. Raises
    ``ValueError``/``TypeError`` for bad inputs (:func:`check_app_inputs`, then the pipeline's checks)
    and ``ImportError`` when ``refine="ecc"`` needs OpenCV.
    """
    # 1. Check inputs
    check_app_inputs(image, reference, ignore_mask)
    moving, target = to_rgb_tensor(image, "image"), to_rgb_tensor(reference, "reference")  # (3, H, W) each

    # 2. Align: the moving image warped at its own size
    output = pipeline(
        moving, reference=target, ignore_mask=ignore_mask, refine=refine, decode=False, output_type="pt"
    )  # fmt: skip
    theta = output.theta.cpu()  # (1, 2, 3) or (1, 3, 3)
    aligned = output.warped_images[0]  # (3, H, W)
    height, width = moving.shape[-2:]
    valid = geometry.valid_mask(theta, height, width)[0]  # (1, H, W)

    # 3. Compare in the reference's frame (θ is normalised: resizing maps one frame onto the other)
    size = _display_size(*target.shape[-2:])
    shown_reference, shown_moving, shown_aligned = (_resize(picture, size) for picture in (target, moving, aligned))
    shown_valid = _resize(valid, size, mode="nearest").bool()  # (1, h, w)
    covered = shown_valid.expand_as(shown_reference)
    after = (shown_aligned - shown_reference).abs()
    return AppAlignment(
        theta=theta,
        pixel_matrix=geometry.theta_to_pixel_matrix(theta.double(), height, width)[0],
        aligned=tensor_to_pil(aligned),
        valid_mask=mask_to_pil(valid),
        confidence=float(output.confidence[0]) if output.confidence is not None else None,
        displacement=float(output.displacement[0]),
        unwarped=bool(output.unwarped[0]),
        refined=bool(output.refined[0]) if output.refined is not None else None,
        blend_before=tensor_to_pil((shown_reference + shown_moving) / 2),
        blend_after=tensor_to_pil((shown_reference + shown_aligned) / 2),
        difference_before=_difference_picture(shown_moving, shown_reference),
        difference_after=_difference_picture(shown_aligned * shown_valid, shown_reference * shown_valid),
        mean_difference_before=float((shown_moving - shown_reference).abs().mean()),
        mean_difference_after=float(after[covered].mean()) if covered.any() else float("nan"),
    )


def _matrix_block(matrix: torch.Tensor, digits: int) -> str:
    rows = ["  ".join(f"{value:+.{digits}f}" for value in row) for row in matrix.tolist()]
    return "```\n" + "\n".join(rows) + "\n```"


def format_report(result: AppAlignment) -> str:
    """The page's Markdown summary of one alignment: θ, its pixel matrix, the confidence and the flags."""
    theta = result.theta[0]
    height, width = result.aligned.height, result.aligned.width
    homography = geometry.is_homography(result.theta)
    # An affine pixel matrix is what cv2.warpAffine takes (2×3); a homography's is the whole 3×3.
    pixel = result.pixel_matrix if homography else result.pixel_matrix[:2]
    warp_call = "cv2.warpPerspective" if homography else "cv2.warpAffine"
    lines = []
    if result.confidence is not None:
        verdict = (
            "the alignment is likely right"
            if result.confidence >= DEFAULT_CONFIDENCE_THRESHOLD
            else "**below the threshold: the alignment is likely wrong**"
        )
        lines.append(f"**Confidence:** {result.confidence:.3f} (threshold {DEFAULT_CONFIDENCE_THRESHOLD}: {verdict})")
    lines.append(f"**Motion:** {result.displacement:.2f} px mean corner displacement of the {width}×{height} image")
    if result.unwarped:
        lines.append("**Unwarped:** yes, θ is the identity: the image is returned untouched")
    if result.refined is not None:
        lines.append(
            "**ECC refinement:** accepted"
            if result.refined
            else "**ECC refinement:** not converged or not supported by the pixels: the STN's θ is kept"
        )
    mean_after = result.mean_difference_after
    lines.append(
        f"**Mean absolute difference:** {result.mean_difference_before:.4f} before, {mean_after:.4f} after "
        "(over the pixels the aligned image covers)"
    )
    rows, columns = tuple(theta.shape)
    lines += [
        f"#### θ ({rows}×{columns}, normalised coordinates)",
        _matrix_block(theta, 6),
        "Maps each aligned position to the moving-image position it samples (PyTorch's `affine_grid`, "
        "`align_corners=False`; see `stn_diffusers.geometry`).",
        f"#### Pixel matrix ({tuple(pixel.shape)[0]}×3, {width}×{height} pixels)",
        _matrix_block(pixel, 4),
        f"Output pixels to moving-image pixels: `{warp_call}(moving, M, ({width}, {height}), "
        "flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)`",
    ]
    return "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------- page
def example_pairs(folder: str | Path) -> list[tuple[str, str, str]]:
    """``(label, moving path, reference path)`` of the page's examples, from bundled photos: a crop of
    the astronaut and the same scene moved by a known warp (both written to ``folder``), and the aloe
    stereo pair."""
    photo = to_rgb_tensor(load_image(ASSETS / EXAMPLE_PHOTO))  # (3, H, W)
    angle = torch.deg2rad(torch.tensor(EXAMPLE_ROTATION_DEGREES))
    params = torch.tensor([[EXAMPLE_SCALE * angle.cos(), EXAMPLE_SCALE * angle.sin(), *EXAMPLE_SHIFT]])
    theta = geometry.params_to_theta(params, "similarity")  # (1, 2, 3), square: the θ that aligns it back
    # A crop and a view sampled from the whole photo: the moved view has picture, not padding, at its edges.
    reference, moving = make_pair(photo, EXAMPLE_SIZE, theta, torch.Generator().manual_seed(0))
    name = Path(EXAMPLE_PHOTO).stem
    paths = {role: Path(folder) / f"{name}_{role}.png" for role in ("moving", "reference")}
    tensor_to_pil(moving).save(paths["moving"])
    tensor_to_pil(reference).save(paths["reference"])
    real_reference, real_moving = REAL_PAIR
    return [
        (f"{name}, moved by {EXAMPLE_ROTATION_DEGREES:g}°", str(paths["moving"]), str(paths["reference"])),
        ("aloe, a real stereo pair", str(ASSETS / real_moving), str(ASSETS / real_reference)),
    ]


def on_align(pipeline, folder: Path, image, reference, ignore_mask, refine: bool):
    """The Align button's callback: every output of the page, in ``build_app``'s order, or a
    ``gradio.Error`` that shows the input's mistake on the page. ``folder`` receives the downloads."""
    gr = import_gradio()
    try:
        result = align_for_app(pipeline, image, reference, ignore_mask, refine=REFINE_METHODS[0] if refine else None)
    except (*USER_ERRORS, ImportError) as error:
        raise gr.Error(" ".join(str(error).split())) from error
    # One folder per alignment: gradio copies the files it serves, and two visitors' files never collide.
    # Named by creation time, so the names sort oldest first.
    output = Path(tempfile.mkdtemp(dir=folder, prefix=f"alignment-{time.time_ns():020d}-"))
    _remove_old_alignments(folder)
    result.aligned.save(output / ALIGNED_FILE)
    result.valid_mask.save(output / VALID_MASK_FILE)
    return (
        format_report(result),
        result.blend_before,
        result.blend_after,
        result.difference_before,
        result.difference_after,
        result.aligned,
        result.valid_mask,
        gr.DownloadButton(value=str(output / ALIGNED_FILE), interactive=True),
        gr.DownloadButton(value=str(output / VALID_MASK_FILE), interactive=True),
    )


def _remove_old_alignments(folder: Path) -> None:
    """Delete all but the newest :data:`KEPT_ALIGNMENTS` alignment folders in ``folder``."""
    alignments = sorted(folder.glob("alignment-*"))
    for old in alignments[:-KEPT_ALIGNMENTS]:
        shutil.rmtree(old, ignore_errors=True)


def build_app(pipeline, refine: str | None = None):
    """The ``gradio.Blocks`` page over ``pipeline`` (an ``STNAlignmentPipeline``), not launched.

    ``refine`` (``None`` or ``"ecc"``) is the initial state of the page's ECC checkbox, which is
    disabled when OpenCV is not installed.
    """
    gr = import_gradio()
    if refine is not None and refine not in REFINE_METHODS:
        raise ValueError(f"expected refine in {(None, *REFINE_METHODS)}, got {refine!r}")
    # Generated examples and the latest downloads live as long as the process; `gradio` copies what it serves.
    folder = Path(tempfile.mkdtemp(prefix="stn-diffusers-app-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    has_opencv = importlib.util.find_spec("cv2") is not None
    if refine is not None:
        import_cv2()  # asked for from the start: say now which extra is missing
    cache = (CACHE_LIFETIME, CACHE_LIFETIME)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=cache) as demo:
        gr.Markdown(
            f"# {TITLE}\nUpload the image to move and the reference to align it onto, then **Align**. θ is "
            f"estimated in the VAE's latent space ({pipeline.vae_scale_factor}× smaller) and applied to the "
            "full-resolution image (no VAE loss)."
        )
        upload = functools.partial(
            gr.Image, type="pil", format="png", sources=["upload", "clipboard"], height=INPUT_HEIGHT
        )  # PNG: an example loaded into an input keeps its pixels exactly
        with gr.Row():
            image = upload(label="Moving image", elem_id="moving-image")
            reference = upload(label="Reference", elem_id="reference-image")
            ignore_mask = upload(
                label="Ignore mask (optional, white = ignore; the reference's size)", image_mode="L",
                elem_id="ignore-mask",
            )  # fmt: skip
        with gr.Row():
            use_ecc = gr.Checkbox(
                value=refine is not None, interactive=has_opencv,
                label="Refine θ with ECC" + ("" if has_opencv else f" (needs OpenCV: {OPENCV_INSTALL_HINT})"),
            )  # fmt: skip
            align_button = gr.Button("Align", variant="primary", elem_id="align-button")
        examples = example_pairs(folder)
        gr.Examples(
            examples=[[moving, target] for _, moving, target in examples], inputs=[image, reference],
            example_labels=[label for label, _, _ in examples], elem_id="examples",
        )  # fmt: skip
        shown = functools.partial(gr.Image, height=OUTPUT_HEIGHT, interactive=False)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    blend_before = shown(label="Reference + moving, 50/50 (before)", elem_id="blend-before")
                    blend_after = shown(label="Reference + aligned, 50/50 (after)", elem_id="blend-after")
                with gr.Row():
                    gain = f"×{DIFFERENCE_GAIN:g}"
                    difference_before = shown(label=f"|reference − moving| {gain}", elem_id="difference-before")
                    difference_after = shown(label=f"|reference − aligned| {gain}", elem_id="difference-after")
                with gr.Row():
                    aligned = shown(label="Aligned image", elem_id="aligned-image")
                    valid_mask = shown(
                        label="Validity mask (white = from inside the moving image)", elem_id="valid-mask"
                    )
            with gr.Column(scale=2):
                report = gr.Markdown("Upload two images and press **Align**.", elem_id="alignment-report")
                download_aligned = gr.DownloadButton("Download the aligned image (PNG)", interactive=False)
                download_mask = gr.DownloadButton("Download the validity mask (PNG)", interactive=False)
        # One alignment at a time: torch already spreads one over every CPU thread it is given.
        align_button.click(
            functools.partial(on_align, pipeline, folder), inputs=[image, reference, ignore_mask, use_ecc],
            outputs=[report, blend_before, blend_after, difference_before, difference_after, aligned, valid_mask,
                     download_aligned, download_mask],
            concurrency_limit=1,
        )  # fmt: skip
    return demo


# ---------------------------------------------------------------------------------------- command
def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``stn-diffusers app`` flags."""
    from .cli import add_pipeline_argument  # the one --pipeline every verb reads through cli.load_pipeline

    add_pipeline_argument(parser)
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to serve on (default: %(default)s, this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port to serve on (default: the first free one from 7860)"
    )
    parser.add_argument(
        "--share", action="store_true", help="also serve through a public gradio.live link (needs the network)"
    )
    parser.add_argument(
        "--refine", default=None, choices=REFINE_METHODS, help="start with θ refinement by OpenCV's ECC switched on"
    )


def run_app(args: argparse.Namespace) -> dict:
    """Serve the page until interrupted (Ctrl-C); gradio is checked before the pipeline loads."""
    from .cli import check_device, load_pipeline

    import_gradio()
    device = check_device(args.device)
    pipeline = load_pipeline(args.pipeline, device)
    demo = build_app(pipeline, refine=args.refine)
    # No server-side rendering: it would start a Node server beside Python for a page this small.
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False)
    return {}
