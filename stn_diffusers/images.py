"""Image inputs: every accepted format to RGB float tensors in ``[0, 1]``, and back.

Accepted per image: a ``PIL.Image`` (any mode; ``L``, ``RGBA``, ``P``, ``I;16``… become RGB, alpha
is dropped), a numpy array ``(H, W)`` / ``(H, W, 1|3|4)``, or a torch tensor ``(C, H, W)`` /
``(1, C, H, W)`` with ``C ∈ {1, 3, 4}``. A batch is a list of those, a numpy array ``(B, H, W, C)``
or a tensor ``(B, C, H, W)``.

Pixel values (one rule for numpy arrays and torch tensors alike):
    - integer dtypes are full scale: ``uint8`` is 0–255 and ``uint16`` 0–65535 (``torch.uint8``
      included); other integer dtypes are rejected (``TypeError``), as their full scale is unknown;
    - ``bool`` is 0/1;
    - floats must lie in ``[0, 1]``; values at most :data:`FLOAT_TOLERANCE` outside (the overshoot of
      bicubic or antialiased resampling) are clamped;
    - anything else (a float image with values up to 255, negative values, NaN) raises ``ValueError``
      naming the expected and the found range.

Orientation:
    Images are used as a viewer shows them: the EXIF orientation of a file (phone photos store the
    pixels sideways plus an ``Orientation`` tag) is applied on every read (:func:`open_image`) and to
    PIL images passed in directly (:func:`upright`). Applying it removes the tag, so it never turns
    an image twice.

Sizes (shared by the pipelines' warnings):
    Two images differ in aspect ratio when their width/height ratios differ by more than
    :data:`ASPECT_TOLERANCE` (:func:`aspect_difference`); resizing both to one size then stretches
    one of them.
"""

from __future__ import annotations

import io
import math
import os
from typing import Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]

# Integer dtypes are full scale: the value that means white.
FULL_SCALE = {"uint8": 255.0, "uint16": 65535.0, "bool": 1.0}
# Bicubic and antialiased resampling overshoot [0, 1] by a little; such values are clamped, not rejected.
FLOAT_TOLERANCE = 1e-3
# Relative difference of width/height ratios below which two images count as one aspect (2 % is
# about 10 px of stretch across 512 px, within the rounding of the working size to the VAE factor).
ASPECT_TOLERANCE = 0.02
# The EXIF tag that says how the camera was held; 1 (or no tag) means the pixels are stored upright.
EXIF_ORIENTATION = 0x0112


def open_image(path: str | os.PathLike, what: str = "image") -> PIL.Image.Image:
    """Open an image file upright (its EXIF orientation applied, see :func:`upright`), its mode kept,
    with an error that names the file when it is missing or unreadable (corrupt, truncated, not an image)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected the {what} file {os.fspath(path)!r}, found none")
    return decode_image(path, f"{what} at {os.fspath(path)!r}")


def decode_image(source: str | os.PathLike | io.BytesIO, what: str = "image") -> PIL.Image.Image:
    """Decode an image file or an in-memory encoded image upright (see :func:`upright`), its mode kept;
    ``ValueError`` ``expected a readable {what}: …`` when it is corrupt, truncated or not an image."""
    try:
        with PIL.Image.open(source) as image:
            image.load()
            return upright(image)  # a new image, valid after the file is closed
    except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"expected a readable {what}: {error}") from error


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open an image file as RGB (see :func:`open_image` for the errors)."""
    return to_pil_rgb(open_image(path))


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """A copy of ``image`` as a viewer shows it: its EXIF orientation applied and removed from its
    EXIF, so a second call changes nothing."""
    return PIL.ImageOps.exif_transpose(image)


def is_upright(image: PIL.Image.Image) -> bool:
    """Whether ``image`` shows as its pixels are stored: no EXIF orientation to apply (see :func:`upright`)."""
    return image.getexif().get(EXIF_ORIENTATION, 1) == 1


def to_pil_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Upright RGB copy of a PIL image of any mode (16-bit grey scaled to 8 bits, alpha dropped)."""
    if not is_upright(image):  # exif_transpose copies even when there is nothing to turn
        image = upright(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = PIL.Image.fromarray((array / peak * 255).round().astype(np.uint8))
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        image = PIL.Image.alpha_composite(PIL.Image.new("RGBA", image.size, (0, 0, 0, 255)), image)
    return image.convert("RGB")


def aspect_difference(size: tuple[int, int], other: tuple[int, int]) -> float:
    """Relative difference of the aspect ratios (width / height) of two ``(H, W)`` sizes: 0 for the
    same aspect, 0.5 for 3:2 against 1:1; compare with :data:`ASPECT_TOLERANCE`."""
    aspect, other_aspect = size[1] / size[0], other[1] / other[0]
    return max(aspect, other_aspect) / min(aspect, other_aspect) - 1.0


def format_size(size: tuple[int, int]) -> str:
    """``(H, W)`` → ``"W×H"``, the way image sizes are written in messages."""
    return f"{size[1]}×{size[0]}"


def to_unit_range(values: np.ndarray | torch.Tensor, where: str = "image") -> torch.Tensor:
    """Pixel values of any shape → float32 tensor of that shape in ``[0, 1]``, by the module's rule
    (integers full scale, bool 0/1, floats in ``[0, 1]``); ``TypeError``/``ValueError`` otherwise."""
    dtype = str(values.dtype).removeprefix("torch.")  # "uint8" for numpy and torch alike
    if isinstance(values, np.ndarray):
        floating = values.dtype.kind == "f"
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    else:
        floating = values.is_floating_point()
        tensor = values.detach().cpu().float()
    if dtype in FULL_SCALE:
        return tensor.div_(FULL_SCALE[dtype])  # in place: the float conversion above made a new tensor
    if not floating:
        raise TypeError(
            f"expected {where} of dtype uint8 (0–255), uint16 (0–65535), bool or float (0–1), got {dtype}; "
            "convert integer images to uint8 or uint16"
        )
    if tensor.numel() == 0:
        return tensor
    low, high = (value.item() for value in torch.aminmax(tensor))  # one pass; NaN anywhere makes both NaN
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"expected {where} with float values in [0, 1], found NaN")
    if low < -FLOAT_TOLERANCE or high > 1.0 + FLOAT_TOLERANCE:
        hint = " (0–255 values? divide by 255 or pass uint8)" if high > 1.0 + FLOAT_TOLERANCE else ""
        raise ValueError(f"expected {where} with float values in [0, 1], found values in [{low:g}, {high:g}]{hint}")
    if low < 0.0 or high > 1.0:
        return tensor.clamp(0.0, 1.0)
    # Already in range: the values as they are (float32 input shares its memory; nothing here writes to it).
    return tensor


def to_chw(image: np.ndarray | torch.Tensor, where: str = "image") -> np.ndarray | torch.Tensor:
    """A numpy array ``(H, W)`` / ``(H, W, C)`` or a tensor ``(H, W)`` / ``(C, H, W)`` / ``(1, C, H, W)``
    → the same values as ``(C, H, W)`` (a view where possible; values not yet scaled)."""
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3:
            raise ValueError(f"expected {where} as a numpy array (H, W) or (H, W, C), got shape {image.shape}")
        return image.transpose(2, 0, 1)
    tensor = image
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        shape = tuple(image.shape)
        raise ValueError(f"expected {where} as a tensor (H, W), (C, H, W) or (1, C, H, W), got shape {shape}")
    return tensor


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
    """One image → upright ``(3, H, W)`` float32 in ``[0, 1]`` (see the module docs for the values)."""
    if isinstance(image, PIL.Image.Image):
        if image.mode != "RGB" or not is_upright(image):
            image = to_pil_rgb(image)  # an upright RGB image (a loaded file) is read as it is, not copied twice
        pixels = torch.from_numpy(np.array(image))  # (H, W, 3) uint8, a writable copy torch can share
        # One pass to float (3, H, W), then scaled in place: a full-resolution photo is copied once.
        chw = pixels.permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        return chw.div_(FULL_SCALE["uint8"])
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return _channels_to_rgb(to_unit_range(to_chw(image, where), where), where)
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


def pick(items: list, index: int):
    """The item of this index, or the one shared item of a list of one (a reference shared by a batch)."""
    return items[0] if len(items) == 1 else items[index]


def to_rgb_list(images: ImageInput | list[ImageInput], where: str = "image") -> list[torch.Tensor]:
    """A single image or a batch → list of ``(3, H, W)`` float32 tensors in ``[0, 1]``."""
    return split_batch(images, to_rgb_tensor, where)


def tensor_to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """``(3, H, W)`` in ``[0, 1]`` → RGB ``PIL.Image``."""
    # Scaled and rounded in place, then to bytes: one float copy of a full-resolution image, not four.
    pixels = image.detach().float().clamp(0, 1).mul_(255).round_().to(torch.uint8)  # (3, H, W)
    return PIL.Image.fromarray(pixels.permute(1, 2, 0).contiguous().cpu().numpy())


# ------------------------------------------------------------------------------------------- masks
# Masks (inpainting masks, ignore masks) follow the value rule above and are binarised here.
MASK_THRESHOLD = 0.5  # fraction of full scale; StableDiffusionInpaintPipeline binarises at the same value


def _pil_mask_to_array(mask: PIL.Image.Image, where: str) -> np.ndarray:
    """Upright PIL mask → ``(H, W)`` float32 grey in ``[0, 1]``."""
    mask = upright(mask)
    bands = len(mask.getbands())
    if bands not in (1, 3):
        raise ValueError(f"expected {where} with 1 (grey) or 3 (RGB) channels, got mode {mask.mode!r} with {bands}")
    if mask.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(mask, dtype=np.float32)
        peak = 65535.0 if array.max() > 255 else 255.0 if array.max() > 1 else 1.0
        return array / peak
    return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0


def _mask_values_to_unit_range(mask: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    """Mask values → float32 in ``[0, 1]`` by the rule of :mod:`stn_diffusers.images`, refusing an
    integer 0/1 mask, which at full scale would silently be empty."""
    dtype = str(mask.dtype).removeprefix("torch.")
    if dtype in ("uint8", "uint16") and math.prod(mask.shape) > 0 and 0 < mask.max() <= 1:
        raise ValueError(
            f"expected {where} of dtype {dtype} at full scale (white = {int(FULL_SCALE[dtype])}), "
            "found values in [0, 1]: pass a 0/1 mask as bool, or multiply it by the full scale"
        )
    return to_unit_range(mask, where)


def to_mask_tensor(mask: ImageInput, where: str = "mask_image") -> torch.Tensor:
    """One mask → binary ``(1, H, W)`` float32 (1 = white: repaint, or ignore for an ignore mask),
    binarised at :data:`MASK_THRESHOLD`. The one mask conversion of the project."""
    if isinstance(mask, PIL.Image.Image):
        grey = torch.from_numpy(_pil_mask_to_array(mask, where))[None]
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        tensor = _mask_values_to_unit_range(to_chw(mask, where), where)  # (C, H, W)
        if tensor.shape[0] not in (1, 3):
            raise ValueError(
                f"expected {where} with 1 (grey) or 3 (RGB, converted to grey) channels, got {tensor.shape[0]} "
                f"(shape {tuple(tensor.shape)})"
            )
        grey = tensor.mean(dim=0, keepdim=True)
    else:
        raise TypeError(f"expected {where} as a PIL.Image, numpy array or torch.Tensor, got {type(mask).__name__}")
    return (grey >= MASK_THRESHOLD).float()


def mask_to_pil(mask: torch.Tensor) -> PIL.Image.Image:
    """``(1, H, W)`` in ``[0, 1]`` → ``L`` mode PIL mask, 255 = white (repaint, ignore, edited)."""
    return PIL.Image.fromarray((mask[0].detach().cpu().numpy() * 255).round().astype(np.uint8), mode="L")


def to_mask_list(masks: ImageInput | list[ImageInput], where: str = "mask_image") -> list[torch.Tensor]:
    """A single mask or a batch → list of binary ``(1, H, W)`` float32 tensors."""
    return split_batch(masks, to_mask_tensor, where)
