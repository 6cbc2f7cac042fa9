"""Write the README's inpainting figure, ``docs/images/inpainting.png``: before / mask / aligned / inpainted.

    python scripts/make_inpainting_figure.py [--pipeline DIR] [--output docs/images/inpainting.png]

The scene: scikit-image's astronaut photo is the reference; the mask is drawn on it over the
shuttle model. A second "shot" is the same photo moved by a known rotation and shift. The image is
aligned into the reference frame with :func:`stn_diffusers.prepare_inpainting_inputs` (θ from the
STN of ``--pipeline``, else of the embedded default pipeline, refined with ECC; without either, ECC
alone from the identity), and the exposed border joins the mask. No Stable Diffusion weights are
available offline, so the "inpainted" panel is a classical fill (OpenCV's Telea inpainting) of the
aligned image and mask; the figure's caption says so. The same inputs go to
``StableDiffusionInpaintPipeline`` unchanged.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import cv2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402

from stn_diffusers import SpatialTransformer, STNAlignmentPipeline, geometry, prepare_inpainting_inputs  # noqa: E402
from stn_diffusers.default import DEFAULT_PIPELINE_DIR  # noqa: E402

SIZE = 512
SHUTTLE_BOX = (345, 0, 470, 250)  # x0, y0, x1, y1 in reference pixels: the shuttle model
MISALIGNMENT = {"degrees": 6.0, "shift_x": 18.0, "shift_y": -12.0}  # the second shot, in pixels
INPAINT_RADIUS = 7  # pixels; Telea's neighbourhood


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pipeline", default=None, help="saved STNAlignmentPipeline folder (default: the embedded one)"
    )
    parser.add_argument("--output", default="docs/images/inpainting.png")
    return parser.parse_args()


def misalignment_theta() -> torch.Tensor:
    """θ of the second shot: a rotation about the centre and a shift, ``(1, 2, 3)``."""
    angle = math.radians(MISALIGNMENT["degrees"])
    centre = (SIZE - 1) / 2
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    to_centre = torch.tensor([[1.0, 0.0, -centre], [0.0, 1.0, -centre], [0.0, 0.0, 1.0]], dtype=torch.float64)
    shift_x, shift_y = MISALIGNMENT["shift_x"], MISALIGNMENT["shift_y"]
    shift = torch.tensor([[1.0, 0.0, shift_x], [0.0, 1.0, shift_y], [0.0, 0.0, 1.0]], dtype=torch.float64)
    pixel = shift @ torch.linalg.inv(to_centre) @ rotation @ to_centre
    return geometry.pixel_matrix_to_theta(pixel[None], SIZE, SIZE).float()


def load_aligner(path: str | None) -> tuple[STNAlignmentPipeline, str]:
    """The aligner and a caption fragment that says where θ comes from."""
    if path is not None:
        return STNAlignmentPipeline.from_pretrained(path), f"STN of {path} + ECC"
    if (DEFAULT_PIPELINE_DIR / "model_index.json").is_file():
        from stn_diffusers import load_default

        return load_default(), "embedded default STN + ECC"
    from diffusers import AutoencoderKL

    # No trained STN here: the seed design starts at the identity, and ECC refines from there.
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), latent_channels=4, norm_num_groups=16,
    )  # fmt: skip
    return STNAlignmentPipeline(vae=vae, stn=SpatialTransformer()), "ECC from the identity (no trained STN found)"


def outline(ax, mask: np.ndarray, colour: str) -> None:
    ax.contour(mask, levels=[0.5], colors=colour, linewidths=1.2)


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    reference = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float().div(255)[None]  # (1, 3, 512, 512)
    theta_true = misalignment_theta()
    moving = geometry.warp(reference, geometry.invert_theta(theta_true), mode="bicubic", padding_mode="border")
    moving = moving.clamp(0, 1)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    x0, y0, x1, y1 = SHUTTLE_BOX
    mask[y0:y1, x0:x1] = 255  # drawn on the reference

    aligner, source = load_aligner(args.pipeline)
    aligner.set_progress_bar_config(disable=True)
    inputs = prepare_inpainting_inputs(
        aligner, moving, mask, reference, mask_frame="reference", align_kwargs={"refine": "ecc"}
    )
    error = geometry.corner_error(inputs.theta, theta_true, SIZE, SIZE).item()

    aligned = (inputs.image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    used_mask = (inputs.mask_image[0, 0].numpy() * 255).astype(np.uint8)
    inpainted = cv2.inpaint(aligned, used_mask, INPAINT_RADIUS, cv2.INPAINT_TELEA)

    panels = [
        ("before: second shot,\nmask as drawn (red)", moving[0].permute(1, 2, 0).numpy(), mask),
        ("mask, drawn on the reference\n(white = repaint)", mask, None),
        (f"aligned (corner error {error:.2f} px),\nmask + exposed border (red)", aligned, used_mask),
        ("inpainted: OpenCV Telea fill\n(not Stable Diffusion)", inpainted, None),
    ]
    figure, axes = plt.subplots(1, 4, figsize=(16, 4.6))
    for ax, (title, picture, contour) in zip(axes, panels):
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        if contour is not None:
            outline(ax, contour, "red")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    figure.suptitle(
        f"prepare_inpainting_inputs: θ from {source}.\nThe inpainted panel is a classical fill "
        "(cv2.inpaint, Telea) standing in for StableDiffusionInpaintPipeline, which takes the same inputs.",
        fontsize=10,
    )
    figure.tight_layout(rect=(0, 0, 1, 0.88))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=80)
    print(f"θ from {source}: corner error {error:.3f} px against the true misalignment")
    masked, exposed = inputs.mask_image.mean().item(), inputs.exposed_mask.mean().item()
    print(f"mask: {masked:.1%} of the frame, of which exposed border {exposed:.1%}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main(parse_args())
