"""Which latent cells of an image hold picture content, and which hold the zero padding of a warp.

A photo that was rotated, zoomed out or shifted before it reaches the aligner (a moving image made
by an earlier warp, a scan straightened by another tool) has black corners or bars where the warp
sampled outside the picture. Their edges are the strongest structure in the latents, and they do
not move with the scene: matched as if they were content, they pull the estimate towards the
padding's own geometry. :func:`content_weights` finds them, so the aligner can count those cells as
uncovered (``moving_weights`` of :meth:`SpatialTransformer.predict_theta`).

Padding is told from dark picture content by two properties: it is exactly black (all channels at
most :data:`PADDING_LEVEL`) over whole latent cells, and it touches the image's border as one
connected region of such cells. A black object inside the frame is content. A photo whose exactly
black region does touch the border (a studio shot on pure black, a night sky clipped to 0) has that
region treated as padding too: its cells are not matched, and the rest of the photo is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Zero padding is exactly 0 (half a level of 8-bit rounding allowed); a photo's shadows rarely are,
# over a whole cell.
PADDING_LEVEL = 0.5 / 255
# A latent cell is padding when at least this share of its pixels is: the cells the padding's edge
# crosses are left to EDGE_CELLS, and a dark photo's near-black texture seldom fills a cell.
PADDING_SHARE = 0.95
# Cells this many cells from padding are not content either: the VAE encoder's receptive field
# carries the padding's edge into the cells next to it.
EDGE_CELLS = 1


def content_weights(images: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """``(B, 1, h, w)`` content weights at ``latent_size``: 0 over zero padding that touches the
    border (and :data:`EDGE_CELLS` around it), 1 elsewhere; ``None`` when no image has any.

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``, as the VAE sees them (``H``, ``W`` multiples of
            ``h``, ``w``).
        latent_size: ``(h, w)``, the latents' grid.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    height, width = latent_size
    # Padding touches the border, so it shows in the border cells' pixels first: a photo with no black
    # pixel there (nearly all) is settled without a pass over the whole image.
    # The border bins of adaptive pooling: ceil(H / h) rows and ceil(W / w) columns.
    band_y, band_x = math.ceil(images.shape[-2] / height), math.ceil(images.shape[-1] / width)
    bands = [images[..., :band_y, :], images[..., -band_y:, :], images[..., :, :band_x], images[..., :, -band_x:]]
    if not any(bool((band.amax(dim=1) <= PADDING_LEVEL).any()) for band in bands):
        return None
    black = (images.amax(dim=1, keepdim=True) <= PADDING_LEVEL).to(torch.float32)  # (B, 1, H, W)
    share = F.adaptive_avg_pool2d(black, (height, width))  # (B, 1, h, w)
    candidate = share >= PADDING_SHARE
    frame = torch.zeros_like(candidate)
    frame[..., 0, :] = frame[..., -1, :] = True
    frame[..., :, 0] = frame[..., :, -1] = True
    padding = candidate & frame
    # Grow the padding from the border through candidate cells: what the border does not reach is content.
    while True:
        grown = (F.max_pool2d(padding.float(), 3, stride=1, padding=1) > 0) & candidate
        if torch.equal(grown, padding):
            break
        padding = grown
    if not bool(padding.any()):
        return None
    size = 2 * EDGE_CELLS + 1
    near = F.max_pool2d(padding.float(), size, stride=1, padding=EDGE_CELLS) > 0
    # An image with no content cell left (all black, or a sliver) is taken whole: there is nothing to exclude it from.
    near = near & ~near.flatten(1).all(dim=1).view(-1, 1, 1, 1)
    return (~near).to(images.dtype)
