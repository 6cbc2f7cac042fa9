"""Write the README's edit re-alignment figure, ``docs/images/realign_edit.jpg``.

    python scripts/make_realign_figure.py [--pipeline DIR] [--output docs/images/realign_edit.jpg]

The scene: scikit-image's coffee photo is an edit model's input. Its simulated output is the same
photo zoomed in by 3 % and shifted by 2 % and 1 % of the side (what edit models do), with a patch of
another photo pasted as the edit and a JPEG pass (`benchmarks/realign_edit.py` makes the same kind of
pair from held-out photos). :func:`stn_diffusers.realign_edit` warps the output back, given the edit
mask, and pastes the input back around the edit. Panels: input | edit output | difference before |
re-aligned and pasted back | difference after (mean absolute RGB difference, ×4).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import PIL.Image
import skimage.data
import torch

from stn_diffusers import data, geometry, realign_edit
from stn_diffusers.cli import load_pipeline

THETA = torch.tensor([[[1.03, 0.0, 0.04], [0.0, 1.03, -0.02]]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None)
    parser.add_argument("--output", default="docs/images/realign_edit.jpg")
    args = parser.parse_args()
    source = torch.from_numpy(skimage.data.coffee().astype(np.float32) / 255).permute(2, 0, 1)
    donor = torch.from_numpy(skimage.data.astronaut().astype(np.float32) / 255).permute(2, 0, 1)
    generator = torch.Generator().manual_seed(1)
    original, edited = data.make_pair(source, 384, THETA, generator)
    edited, changed = data.paste_local_change(edited, donor, 0.12, generator)
    buffer = io.BytesIO()
    PIL.Image.fromarray((edited.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buffer, format="JPEG", quality=90
    )
    edited = torch.from_numpy(np.asarray(PIL.Image.open(buffer), dtype=np.float32) / 255).permute(2, 0, 1)
    edit_mask = geometry.warp(changed[None], THETA, mode="nearest")[0]
    out = realign_edit(
        edited, original, edit_mask, pipeline=load_pipeline(args.pipeline, "cpu"), paste_back=True, output_type="pt"
    )
    error = float(geometry.corner_error(out.theta[:, :2], THETA, 384, 384))

    def difference(image: torch.Tensor) -> torch.Tensor:
        return ((image - original).abs().mean(0, keepdim=True) * 4).clamp(0, 1).expand(3, -1, -1)

    panels = [original, edited, difference(edited), out.image, difference(out.image)]
    gap = torch.ones(3, 384, 8)
    row = torch.cat([p for panel in panels for p in (panel, gap)][:-1], dim=2)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray((row.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(args.output, quality=88)
    print(f"wrote {args.output}; corner error of θ {error:.3f} px")


if __name__ == "__main__":
    main()
