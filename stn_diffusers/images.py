"""Image inputs: every accepted format to RGB float tensors in ``[0, 1]``, and back.

Accepted per image: a ``PIL.Image`` (any mode; ``L``, ``RGBA``, ``P``, ``I;16``… become RGB, alpha
is dropped), a numpy array ``(H, W)``, ``(H, W, 1|3|4)`` (``uint8`` in ``[0, 255]`` or float in
``[0, 1]``), or a torch tensor ``(C, H, W)`` / ``(1, C, H, W)`` with ``C ∈ {1, 3, 4}`` in ``[0, 1]``.
A batch is a list of those, a numpy array ``(B, H, W, C)`` or a tensor ``(B, C, H, W)``.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import PIL.Image
import torch

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]


def open_image(path: str | os.PathLike, what: str = "image") -> PIL.Image.Image:
    """Open an image file as stored (mode kept), with an error that names the file when it is
    missing or unreadable (corrupt, truncated, not an image)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected the {what} file {os.fspath(path)!r}, found none")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"expected a readable {what} at {os.fspath(path)!r}: {error}") from error


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file as RGB (see :func:`open_image` for the errors)."""
    return to_pil_rgb(open_image(path))


def to_pil_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB copy of a PIL image of any mode (16-bit grey scaled to 8 bits, alpha dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = PIL.Image.fromarray((array / peak * 255).round().astype(np.uint8))
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, (0, 0, 0, 255)), image)
    return image.convert("RGB")


def _channels_to_rgb(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``(C, H, W)`` with C in {1, 3, 4} → ``(3, H, W)``."""
    channels = tensor.shape[0]
    if channels == 1:
        return tensor.expand(3, -1, -1).clone()
    if channels == 3:
        return tensor
    if channels == 4:
        return tensor[:3]
    raise ValueError(f"expected {where} with 1, 3 or 4 channels, got {channels} (shape {tuple(tensor.shape)})")


def to_rgb_tensor(image: ImageInput, where: str = "image") -> torch.Tensor:
    """One image → ``(3, H, W)`` float32 in ``[0, 1]``."""
    if isinstance(image, PIL.Image.Image):
        array = np.asarray(to_pil_rgb(image), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise ValueError(f"expected {where} as a numpy array (H, W) or (H, W, C), got shape {image.shape}")
        scale = 255.0 if image.dtype == np.uint8 else 65535.0 if image.dtype == np.uint16 else 1.0
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / scale).permute(2, 0, 1)
        return _channels_to_rgb(tensor, where)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 3:
            raise ValueError(f"expected {where} as a tensor (C, H, W), got shape {tuple(image.shape)}")
        return _channels_to_rgb(tensor, where)
    raise TypeError(f"expected {where} as a PIL.Image, numpy array or torch.Tensor, got {type(image).__name__}")


def split_batch(images, convert, where: str) -> list:
    """A single input or a batch (list, ``(B, ...)`` array or tensor) → ``[convert(item, name), ...]``."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError(f"expected at least one {where}, got an empty list")
        return [convert(image, f"{where}[{i}]") for i, image in enumerate(images)]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [convert(image, f"{where}[{i}]") for i, image in enumerate(images)]
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] > 1:
        return [convert(image, f"{where}[{i}]") for i, image in enumerate(images)]
    return [convert(images, where)]


def to_rgb_list(images: ImageInput | list[ImageInput], where: str = "image") -> list[torch.Tensor]:
    """A single image or a batch → list of ``(3, H, W)`` float32 tensors in ``[0, 1]``."""
    return split_batch(images, to_rgb_tensor, where)


def tensor_to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """``(3, H, W)`` in ``[0, 1]`` → RGB ``PIL.Image``."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(array)
