"""Image folders and seeded misaligned pairs, shared by fine-tuning, evaluation and analysis.

A pair is made from one photo: the reference ``R`` is a ``resolution × resolution`` crop; the
moving image ``M`` shows the same scene moved by a random affine ``A`` about the crop centre,
sampled from the *whole* photo, so ``M`` has real content where a crop-and-warp would have
padding. The ground-truth θ that aligns ``M`` onto ``R`` is ``A`` (see ``geometry``):
``warp(M, theta) ≈ R`` wherever the photo covers both.

Photos come from a folder (:func:`load_photo_folder`) or from an image column of a Hugging Face
dataset (:func:`load_photo_dataset`: a folder written by ``save_to_disk``, an ``imagefolder``
folder, or a Hub id), and :func:`load_photos` takes either, for fine-tuning and evaluation alike.
The ``datasets`` library is imported only when a dataset is read (``pip install "stn-diffusers[datasets]"``).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from . import geometry
from .images import decode_image, load_image, open_image, to_pil_rgb, to_rgb_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Photometric change of a moving view: none, or a second shot of the scene (:func:`photometric_jitter`).
PHOTOMETRIC_MODES = ("none", "realistic")

# Photos bundled with the package (see the README for their sources and licences).
ASSETS = Path(__file__).resolve().parent / "assets"
SYNTHETIC_PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg")
REAL_PAIR = ("aloeL.jpg", "aloeR.jpg")  # (reference, moving): a stereo pair with no ground truth

# Seed strides: pair/view generators are seeded ``seed * SEED_STRIDE + index * PHOTO_STRIDE + view``,
# so that seeds of different runs, photos and views never collide.
SEED_STRIDE = 1_000_003
PHOTO_STRIDE = 1_009


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), by extension.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` for one with no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a folder of images at {str(folder)!r}, found none")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise ValueError(f"expected image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}, found none")
    return paths


def load_images(paths: list[Path], strict: bool = False) -> tuple[list[PIL.Image.Image], list[Path]]:
    """Load RGB images; unreadable files are skipped with one warning that counts and names them.

    Returns ``(images, loaded_paths)``. With ``strict=True`` the first unreadable file raises.
    """
    images, loaded, bad = [], [], []
    for path in paths:
        try:
            images.append(load_image(path))
            loaded.append(Path(path))
        except ValueError:
            if strict:
                raise
            bad.append(Path(path))
    if bad:
        names = ", ".join(str(p) for p in bad)
        logger.warning("Skipped %d unreadable image(s): %s", len(bad), names)
    if not images:
        raise ValueError(f"expected at least one readable image, all {len(paths)} failed to load")
    return images, loaded


def load_photo_folder(folder: str | os.PathLike, strict: bool = False) -> tuple[list[torch.Tensor], list[Path]]:
    """Every readable photo under ``folder`` (recursive, sorted) as ``(3, H, W)`` tensors in ``[0, 1]``,
    upright (EXIF orientation applied), and their paths. The one photo-folder loader of the project:
    fine-tuning, evaluation and analysis read folders through it (VAE training keeps PIL images for its
    own resizes, from the same :func:`list_images` and :func:`load_images`).

    Unreadable files are skipped with one warning (``strict=True``: the first one raises).
    """
    images, paths = load_images(list_images(folder), strict=strict)
    return [to_rgb_tensor(image) for image in images], paths


def bundled_photos() -> tuple[list[torch.Tensor], list[str]]:
    """The photos bundled with the package (:data:`SYNTHETIC_PHOTOS`) as ``(3, H, W)`` tensors, and names."""
    images, paths = load_images([ASSETS / name for name in SYNTHETIC_PHOTOS], strict=True)
    return [to_rgb_tensor(image) for image in images], [path.name for path in paths]


# ------------------------------------------------------------------------- Hugging Face datasets
DATASETS_INSTALL_HINT = 'pip install "stn-diffusers[datasets]"'
DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_SPLIT = "train"
# What `save_to_disk` leaves in its folder: one split (a Dataset), or a dictionary of splits.
SAVED_DATASET_FILE = "state.json"
SAVED_DATASET_DICT_FILE = "dataset_dict.json"


def import_datasets():
    """The ``datasets`` library, or an ``ImportError`` that names the extra to install."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"reading a Hugging Face dataset needs the `datasets` library, which is not installed; install it "
            f"with `{DATASETS_INSTALL_HINT}`"
        ) from error
    return datasets


def load_dataset_split(name_or_path: str | os.PathLike, config: str | None = None, split: str = DEFAULT_SPLIT):
    """One split of a Hugging Face dataset, as a ``datasets.Dataset``.

    ``name_or_path`` is a folder written by ``save_to_disk`` (a dictionary of splits, or one split:
    then ``split`` is not looked at), any other local folder (``load_dataset`` reads it: an
    ``imagefolder`` of images, parquet or CSV files), or a Hub id (downloaded, or read from the cache
    when offline). ``config`` is the dataset's configuration name, where it has several.

    Raises ``ValueError`` naming the dataset and the split when it cannot be read (an unknown split
    lists the ones there are).
    """
    datasets = import_datasets()
    path = Path(name_or_path)
    try:
        if (path / SAVED_DATASET_DICT_FILE).is_file():
            splits = datasets.load_from_disk(str(path))
            if split not in splits:
                raise ValueError(f"expected a split in {sorted(splits)}, got {split!r}")
            return splits[split]
        if (path / SAVED_DATASET_FILE).is_file():
            return datasets.load_from_disk(str(path))
        if path.exists() and not path.is_dir():
            raise ValueError("expected a dataset folder or a Hub id, got a file")
        return datasets.load_dataset(str(name_or_path), config, split=split)
    except (ValueError, OSError) as error:  # a missing Hub id or no network is an OSError
        raise ValueError(f"could not read split {split!r} of the dataset {str(name_or_path)!r}: {error}") from error


def undecoded_image_columns(dataset, columns: list[str]):
    """``dataset`` with each of ``columns`` checked to hold images and left undecoded.

    Decoding is left to :func:`decode_dataset_image`, one cell at a time, so that a corrupt cell
    fails alone and reading a row does not decode the columns not asked for. A column holds images
    when its feature is ``datasets.Image`` (cells ``{"bytes", "path"}`` once undecoded) or strings
    (file paths). Raises ``ValueError`` naming the dataset's columns when one is missing.
    """
    datasets = import_datasets()
    for column in columns:
        if column not in dataset.column_names:
            known = ", ".join(dataset.column_names)
            raise ValueError(f"expected a column {column!r} in the dataset (its columns: {known}), found none")
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(
                f"expected the column {column!r} to hold images (datasets.Image or file paths), got {feature}"
            )
    return dataset


def decode_dataset_image(cell, where: str) -> PIL.Image.Image:
    """One undecoded cell of an image column (:func:`undecoded_image_columns`) → an upright PIL image,
    its mode kept (as :func:`stn_diffusers.images.open_image` reads a file). ``where`` names the cell in
    the ``ValueError`` raised for an empty or unreadable one."""
    if isinstance(cell, str):
        return open_image(cell, where)
    encoded = cell.get("bytes") if isinstance(cell, dict) else None
    if encoded is None:
        path = cell.get("path") if isinstance(cell, dict) else None
        if not path:
            raise ValueError(f"expected an image in {where}, got an empty cell")
        return open_image(path, where)
    return decode_image(io.BytesIO(encoded), f"image in {where}")


def dataset_cell_names(dataset, column: str) -> list[str]:
    """A name per row of an undecoded image column: its file's name where the cell keeps a path,
    else ``column[row]``. Reads the paths alone, never the images."""
    feature = dataset.features[column]
    if isinstance(feature, import_datasets().Image):
        paths = dataset.select_columns([column]).flatten()[f"{column}.path"]
    else:
        paths = dataset[column]
    return [Path(path).name if path else f"{column}[{row}]" for row, path in enumerate(paths)]


def load_photo_dataset(
    name_or_path: str | os.PathLike,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    config: str | None = None,
    split: str = DEFAULT_SPLIT,
    strict: bool = False,
) -> tuple[list[torch.Tensor], list[str]]:
    """Every readable image of ``image_column`` in one split of a dataset (see :func:`load_dataset_split`)
    as upright ``(3, H, W)`` tensors in ``[0, 1]``, and a name per image (:func:`dataset_cell_names`):
    the dataset counterpart of :func:`load_photo_folder`.

    Unreadable cells are skipped with one warning (``strict=True``: the first one raises); a split
    with no readable image raises ``ValueError``.
    """
    dataset = undecoded_image_columns(load_dataset_split(name_or_path, config, split), [image_column])
    names = dataset_cell_names(dataset, image_column)
    images, kept, bad = [], [], []
    for row, cell in enumerate(dataset[image_column]):
        where = f"row {row} ({names[row]}) of the column {image_column!r}"
        try:
            images.append(to_rgb_tensor(to_pil_rgb(decode_dataset_image(cell, where))))
            kept.append(names[row])
        except ValueError:
            if strict:
                raise
            bad.append(names[row])
    if bad:
        logger.warning("Skipped %d unreadable image(s) of the column %r: %s", len(bad), image_column, ", ".join(bad))
    if not images:
        found = f"all {len(bad)} failed to load" if bad else "found none"
        raise ValueError(
            f"expected at least one readable image in the column {image_column!r} of split {split!r} of "
            f"{str(name_or_path)!r}, {found}"
        )
    return images, kept


def load_photos(
    folder: str | os.PathLike | None = None,
    dataset: str | os.PathLike | None = None,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    dataset_config: str | None = None,
    split: str = DEFAULT_SPLIT,
    strict: bool = False,
) -> tuple[list[torch.Tensor], list[str], list[Path | None]]:
    """Photos from a ``folder`` (:func:`load_photo_folder`) or an image column of a ``dataset``
    (:func:`load_photo_dataset`), exactly one of the two: ``(3, H, W)`` tensors in ``[0, 1]``, a name
    each, and the file each was read from (``None`` for a dataset's rows)."""
    if (folder is None) == (dataset is None):
        raise ValueError(
            f"expected a folder of photos or a dataset (one of them), got {'both' if folder is not None else 'neither'}"
        )
    if folder is not None:
        images, paths = load_photo_folder(folder, strict=strict)
        return images, [path.name for path in paths], list(paths)
    images, names = load_photo_dataset(dataset, image_column, dataset_config, split, strict)
    return images, names, [None] * len(images)


def fit_shorter_side(image: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Resize ``(3, H, W)`` so its shorter side lies in ``[low, high]`` (aspect kept).

    Images smaller than ``low`` are upscaled to it; larger than ``high``, downscaled to it.
    """
    shorter = min(image.shape[-2:])
    target = min(max(shorter, low), high)
    if target == shorter:
        return image
    scale = target / shorter
    size = [max(low, round(side * scale)) for side in image.shape[-2:]]
    resized = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp(0, 1)


def crop_theta(
    source_size: tuple[int, int], crop_size: int, generator: torch.Generator | None, margin: float = 0.0
) -> torch.Tensor:
    """θ ``(1, 2, 3)`` that samples a random ``crop_size`` square from a source of ``(H, W)``.

    The crop centre keeps ``margin`` (a fraction of the crop) from the source edges where the
    source is large enough, so warped views of the crop still find real content.
    """
    height, width = source_size
    theta = torch.zeros(1, 2, 3)
    for axis, extent in ((0, width), (1, height)):
        half = crop_size / 2 * (1 + margin)
        low, high = min(half, extent / 2), max(extent - half, extent / 2)
        centre = low + (high - low) * torch.rand(1, generator=generator).item()
        theta[0, axis, axis] = crop_size / extent
        theta[0, axis, 2] = 2 * centre / extent - 1
    return theta


@dataclass
class Pair:
    """A misaligned pair: ``reference`` and ``moving`` ``(3, S, S)`` in ``[0, 1]``; ``theta`` ``(2, 3)``
    aligns ``moving`` onto ``reference``; ``name`` is the source photo. ``changed`` ``(1, S, S)``, when
    set, marks the pixels of ``moving`` replaced by other content (a local change, see
    :func:`paste_local_change`); ``warp(changed[None], theta[None])`` is the same region in the
    reference frame."""

    reference: torch.Tensor
    moving: torch.Tensor
    theta: torch.Tensor
    name: str = ""
    changed: torch.Tensor | None = None


def make_pair(
    source: torch.Tensor,
    resolution: int,
    theta: torch.Tensor,
    generator: torch.Generator | None = None,
    margin: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(reference, moving)``, each ``(3, resolution, resolution)``, from one source ``(3, H, W)``.

    ``theta`` ``(1, 2, 3)`` or ``(1, 3, 3)`` is the misalignment to synthesise (the θ that aligns
    moving onto reference).
    """
    crop = crop_theta(tuple(source.shape[-2:]), resolution, generator, margin)
    size = (resolution, resolution)
    batch = source.unsqueeze(0)
    reference = geometry.warp(batch, crop, size=size)[0]
    # M(q) = R(θ⁻¹ q) = S(crop · θ⁻¹ q): sample the moving view straight from the whole photo.
    moving = geometry.warp(batch, geometry.compose_theta(crop, geometry.invert_theta(theta)), size=size)[0]
    return reference, moving


def photometric_jitter(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A second shot of the same scene: brightness, contrast, gamma, sensor noise, JPEG.

    ``(3, H, W)`` in ``[0, 1]`` → same shape; deterministic for a given ``generator`` state.
    """

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(1, generator=generator).item()

    out = image.clamp(0, 1) ** uniform(0.8, 1.25)  # gamma
    mean = out.mean()
    out = (out - mean) * uniform(0.8, 1.2) + mean + uniform(-0.08, 0.08)  # contrast, brightness
    noise = torch.randn(out.shape, generator=generator) * uniform(0.005, 0.02)
    out = (out + noise).clamp(0, 1)
    quality = int(uniform(60, 95))
    buffer = io.BytesIO()
    array = (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with PIL.Image.open(buffer) as jpeg:
        return to_rgb_tensor(jpeg)


# Local changes draw from generators of their own, offset so that they never meet a pair's seed.
LOCAL_CHANGE_SEED_OFFSET = SEED_STRIDE // 2
# A pasted region's aspect ratio (width / height) is drawn from this range.
LOCAL_CHANGE_ASPECT = (0.5, 2.0)


def paste_local_change(
    moving: torch.Tensor, donor: torch.Tensor, fraction: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random rectangle covering ``fraction`` of ``moving`` ``(3, S, S)`` by content of
    ``donor`` ``(3, H, W)`` (another photo): an object that moved, a pasted patch, an edit.

    Returns ``(changed_moving, mask)`` with ``mask`` ``(1, S, S)`` set to 1 on the replaced pixels.
    Deterministic for a given ``generator`` state.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"expected a local change fraction in (0, 1), got {fraction}")

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(1, generator=generator).item()

    height, width = moving.shape[-2:]
    aspect = uniform(*LOCAL_CHANGE_ASPECT)
    box_height = min(height, max(1, round((fraction * height * width / aspect) ** 0.5)))
    box_width = min(width, max(1, round(fraction * height * width / box_height)))
    top = int(uniform(0, height - box_height + 1 - 1e-9))
    left = int(uniform(0, width - box_width + 1 - 1e-9))
    # The donor's content at the patch size, from a random window of the donor.
    donor = fit_shorter_side(donor, max(box_height, box_width), 2 * max(box_height, box_width, 1))
    donor_top = int(uniform(0, donor.shape[-2] - box_height + 1 - 1e-9))
    donor_left = int(uniform(0, donor.shape[-1] - box_width + 1 - 1e-9))
    changed = moving.clone()
    changed[:, top : top + box_height, left : left + box_width] = donor[
        :, donor_top : donor_top + box_height, donor_left : donor_left + box_width
    ]
    mask = torch.zeros(1, height, width, dtype=moving.dtype)
    mask[:, top : top + box_height, left : left + box_width] = 1
    return changed, mask


def seeded_pairs(
    sources: list[torch.Tensor],
    num_pairs: int,
    resolution: int = 512,
    warp: str | geometry.WarpRange = "standard",
    seed: int = 0,
    photometric: str = "none",
    names: list[str] | None = None,
    local_change: float = 0.0,
) -> list[Pair]:
    """``num_pairs`` pairs cycling over ``sources`` ``(3, H, W)``; identical for the same arguments.

    Pair ``i`` is :func:`seeded_pair` ``(…, index=i)``: it has its own generator seeded from
    ``(seed, index)``, so it does not depend on how many pairs are drawn. ``photometric``: one of
    :data:`PHOTOMETRIC_MODES` (see :func:`photometric_jitter`). ``local_change`` ``∈ [0, 1)``: the
    fraction of each moving image replaced by content of the next source photo
    (:func:`paste_local_change`, marked in ``Pair.changed``); drawn from a generator of its own, so the
    pairs are otherwise those drawn without it. With ``warp="none"`` these are zero-motion pairs with a
    local change: the true answer is the identity.
    """
    return [
        seeded_pair(sources, index, resolution, warp, seed, photometric, names, local_change)
        for index in range(num_pairs)
    ]


def seeded_pair(
    sources: list[torch.Tensor],
    index: int,
    resolution: int = 512,
    warp: str | geometry.WarpRange = "standard",
    seed: int = 0,
    photometric: str = "none",
    names: list[str] | None = None,
    local_change: float = 0.0,
) -> Pair:
    """Pair ``index`` of :func:`seeded_pairs` with the same arguments, made alone (a benchmark writing
    thousands of pairs holds one at a time)."""
    if photometric not in PHOTOMETRIC_MODES:
        raise ValueError(f"expected photometric in {PHOTOMETRIC_MODES}, got {photometric!r}")
    if not 0.0 <= local_change < 1.0:
        raise ValueError(f"expected local_change in [0, 1), got {local_change}")
    if not sources:
        raise ValueError("expected at least one source image, got none")
    warp_range = geometry.get_warp_range(warp)
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + index)
    source_index = index % len(sources)
    source = fit_shorter_side(sources[source_index], resolution, 2 * resolution)
    theta = geometry.random_theta(1, warp_range, resolution, resolution, generator)
    reference, moving = make_pair(source, resolution, theta, generator)
    if photometric == "realistic":
        moving = photometric_jitter(moving, generator)
    changed = None
    if local_change > 0:
        change_generator = torch.Generator().manual_seed(seed * SEED_STRIDE + index + LOCAL_CHANGE_SEED_OFFSET)
        donor = sources[(source_index + 1) % len(sources)]
        if len(sources) == 1:
            donor = donor.flip(-2)  # one photo only: its upside-down view is other content
        moving, changed = paste_local_change(moving, donor, local_change, change_generator)
    name = names[source_index] if names is not None else f"image{source_index}"
    return Pair(reference=reference, moving=moving, theta=theta[0], name=name, changed=changed)


# ------------------------------------------------------------------------------- latent pair pools
WARP_SPACES = ("latent", "pixel")


@dataclass(frozen=True)
class PoolSettings:
    """What a pool of training views depends on; part of every cache key.

    Attributes:
        resolution: side of the square crops in pixels.
        warp: the full warp range (a :class:`geometry.WarpRange`).
        warp_space: ``"pixel"`` (warp the photo, then encode: one encoded view per pool entry) or
            ``"latent"`` (encode the reference crop only; moving latents are warped latents).
        pairs_per_image: pixel-warped views encoded per photo (ignored in latent space).
        photometric: one of :data:`PHOTOMETRIC_MODES` (``"realistic"`` jitters every moving view, see
            :func:`photometric_jitter`).
        seed: seeds the crops and the warps.
        min_amount: the smallest view's warp range, as a fraction of ``warp``; views ramp up to 1.
    """

    resolution: int = 512
    warp: geometry.WarpRange = geometry.WARP_PRESETS["standard"]
    warp_space: str = "pixel"
    pairs_per_image: int = 8
    photometric: str = "none"
    seed: int = 0
    min_amount: float = 0.1

    def __post_init__(self):
        if self.warp_space not in WARP_SPACES:
            raise ValueError(f"expected warp_space in {WARP_SPACES}, got {self.warp_space!r}")
        if self.photometric not in PHOTOMETRIC_MODES:
            raise ValueError(f"expected photometric in {PHOTOMETRIC_MODES}, got {self.photometric!r}")
        if self.pairs_per_image < 1:
            raise ValueError(f"expected pairs_per_image >= 1, got {self.pairs_per_image}")

    @property
    def num_views(self) -> int:
        """Views per photo: the reference crop, plus ``pairs_per_image`` warped views in pixel space."""
        return 1 + (self.pairs_per_image if self.warp_space == "pixel" else 0)

    def view_amounts(self) -> torch.Tensor:
        """``(num_views,)`` warp amount of each view: 0 for the reference, then evenly up to 1."""
        count = self.num_views - 1
        ramp = torch.linspace(self.min_amount, 1.0, count) if count > 1 else torch.ones(count)
        return torch.cat([torch.zeros(1), ramp])

    def to_json(self) -> dict:
        return {**self.__dict__, "warp": self.warp.__dict__}


def _view_generator(settings: PoolSettings, image_index: int, view_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(settings.seed * SEED_STRIDE + image_index * PHOTO_STRIDE + view_index)


def view_thetas(settings: PoolSettings, image_index: int) -> torch.Tensor:
    """``(num_views, 2, 3)``, or ``(num_views, 3, 3)`` when the warp range has perspective: θ that
    aligns each view of photo ``image_index`` onto its reference crop (view 0, the identity).
    Cheap and deterministic: no pixels are touched."""
    amounts = settings.view_amounts()
    thetas = [geometry.identity_theta(1)]
    for view in range(1, settings.num_views):
        generator = _view_generator(settings, image_index, view)
        warp_range = settings.warp.scaled(float(amounts[view]))
        thetas.append(geometry.random_theta(1, warp_range, settings.resolution, settings.resolution, generator))
    if settings.warp.perspective > 0:  # one shape for all views, the identity included
        thetas = [geometry.to_homogeneous(theta) for theta in thetas]
    return torch.cat(thetas)


def render_views(
    source: torch.Tensor, settings: PoolSettings, image_index: int, views: list[int] | None = None
) -> torch.Tensor:
    """The pixel views of one photo ``(3, H, W)`` in ``[0, 1]``: ``(len(views), 3, S, S)``.

    Every view shares one crop (seeded by the photo's index); view ``k > 0`` is sampled from the
    whole photo through ``view_thetas(...)[k]``, so it has real content where a warped crop would
    have padding, and is photometrically jittered when ``settings.photometric == "realistic"``.
    """
    views = list(range(settings.num_views)) if views is None else views
    source = fit_shorter_side(source, settings.resolution, 2 * settings.resolution)
    thetas = view_thetas(settings, image_index)
    crop_seed = settings.seed * SEED_STRIDE + image_index * PHOTO_STRIDE + PHOTO_STRIDE - 1  # never a view's seed
    rendered = []
    for view in views:
        crop_generator = torch.Generator().manual_seed(crop_seed)
        reference, moving = make_pair(source, settings.resolution, thetas[view : view + 1], crop_generator)
        if view == 0:
            rendered.append(reference)
            continue
        if settings.photometric == "realistic":
            moving = photometric_jitter(moving, _view_generator(settings, image_index, settings.num_views + view))
        rendered.append(moving)
    return torch.stack(rendered)


def cache_key(photo: str | os.PathLike | torch.Tensor, settings: PoolSettings, encoder_id: str) -> str:
    """A file name for the encoded views of ``photo``: changes with the photo, the pool settings and
    the encoder (e.g. a VAE fingerprint). A photo file is known by its path, size and mtime (no need
    to read it); a photo with no file of its own (a dataset's row, ``(3, H, W)``) by a digest of its pixels."""
    import hashlib
    import json

    if isinstance(photo, torch.Tensor):
        pixels = hashlib.sha256(photo.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        source = ["pixels", list(photo.shape), str(photo.dtype), pixels]
    else:
        stat = Path(photo).stat()
        source = [str(Path(photo).resolve()), stat.st_size, stat.st_mtime_ns]
    identity = [*source, settings.to_json(), encoder_id]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24] + ".pt"


class LatentPairPool:
    """Encoded views of every training photo and the seeded sampler of training pairs over them.

    ``latents[i]`` is ``(num_views, C, h, w)`` for photo ``i`` (view 0 is the reference crop) and
    ``thetas[i]`` ``(num_views, 2, 3)`` aligns each view onto view 0. With ``encode_view`` set instead
    of cached latents, every requested view is rendered and encoded on demand (the slow path, kept
    to measure what the cache saves).

    A training pair is two distinct views ``(moving j, reference r)`` of one photo; the θ that aligns
    view ``j`` onto view ``r`` is ``T_j · T_r⁻¹`` (``compose_theta(T_j, invert_theta(T_r))``), so a
    pool of ``P`` warped views yields ``(P + 1) · P`` pairs. In latent space the moving latents are
    the reference latents warped by a fresh random θ instead.
    """

    def __init__(
        self,
        settings: PoolSettings,
        thetas: list[torch.Tensor],
        latents: list[torch.Tensor] | None = None,
        encode_view=None,
    ):
        if (latents is None) == (encode_view is None):
            raise ValueError("expected exactly one of latents (cached views) or encode_view (encode on demand)")
        self.settings = settings
        self.thetas = thetas
        self.latents = latents
        self.encode_view = encode_view
        self.amounts = settings.view_amounts()

    def __len__(self) -> int:
        return len(self.thetas)

    def _view(self, image_index: int, view: int) -> torch.Tensor:
        if self.latents is not None:
            return self.latents[image_index][view]
        return self.encode_view(image_index, view)

    def _eligible_views(self, amount: float) -> list[int]:
        """Warped views whose warp amount the curriculum allows (always at least the smallest)."""
        views = [v for v in range(1, self.settings.num_views) if self.amounts[v] <= amount + 1e-6]
        return views or [1]

    def sample(
        self, batch_size: int, generator: torch.Generator, amount: float = 1.0, reference_rate: float = 0.5
    ) -> dict:
        """A batch of training pairs, deterministic for a given ``generator`` state.

        Args:
            amount: the curriculum's warp amount in ``[0, 1]`` (fraction of the full range).
            reference_rate: in pixel space, how often the reference is the clean crop (view 0);
                otherwise it is another warped view (a compound, usually larger, misalignment).

        Returns:
            ``{"moving": (B, C, h, w), "reference": (B, C, h, w), "theta": (B, 2, 3) or (B, 3, 3),
            "image_index": (B,)}``
        """

        def randint(high: int) -> int:
            return int(torch.randint(high, (1,), generator=generator))

        moving, reference, theta, indices = [], [], [], []
        size = self.settings.resolution
        for _ in range(batch_size):
            image = randint(len(self))
            indices.append(image)
            if self.settings.warp_space == "latent":
                ref = self._view(image, 0)
                true = geometry.random_theta(1, self.settings.warp.scaled(amount), size, size, generator)
                moving.append(geometry.warp(ref.unsqueeze(0), geometry.invert_theta(true))[0])
                reference.append(ref)
                theta.append(true[0])
                continue
            views = self._eligible_views(amount)
            mov = views[randint(len(views))]
            ref_view = 0
            if torch.rand(1, generator=generator).item() >= reference_rate:
                others = [0, *(v for v in views if v != mov)]
                ref_view = others[randint(len(others))]
                if ref_view != 0 and torch.rand(1, generator=generator).item() < 0.5:
                    mov, ref_view = ref_view, mov  # either order: the inverse problem is as real
            thetas = self.thetas[image]
            true = geometry.compose_theta(thetas[mov : mov + 1], geometry.invert_theta(thetas[ref_view : ref_view + 1]))
            moving.append(self._view(image, mov))
            reference.append(self._view(image, ref_view))
            theta.append(true[0])
        return {
            "moving": torch.stack(moving),
            "reference": torch.stack(reference),
            "theta": torch.stack(theta),
            "image_index": torch.tensor(indices),
        }


def build_latent_pool(
    views_of,
    keys: list[str],
    settings: PoolSettings,
    encode,
    cache_dir: str | os.PathLike | None = None,
    shard: tuple[int, int] = (0, 1),
    barrier=None,
    progress=None,
) -> LatentPairPool:
    """Encode every photo's views once and return the pool over them.

    Args:
        views_of: ``views_of(i)`` → ``(num_views, 3, S, S)`` pixels in ``[0, 1]`` of photo ``i``
            (e.g. :func:`render_views`); called only for photos not cached yet.
        keys: one cache file name per photo (:func:`cache_key`).
        encode: ``(N, 3, S, S)`` in ``[0, 1]`` → latents ``(N, C, h, w)``; called without gradients.
        cache_dir: where encoded views are kept across runs (written atomically); ``None`` keeps
            them in memory only.
        shard: ``(index, count)``: this process encodes photos ``index, index + count, …`` and,
            after ``barrier()``, loads everyone's from ``cache_dir`` (distributed runs).
        progress: called once per photo this process handles.
    """
    index, count = shard
    if count > 1 and cache_dir is None:
        raise ValueError("expected a cache_dir when the pool is built by several processes (they share it on disk)")
    latents: dict[int, torch.Tensor] = {}
    directory = Path(cache_dir) if cache_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    for i in range(index, len(keys), count):
        path = directory / keys[i] if directory is not None else None
        if path is None or not path.exists():
            with torch.no_grad():
                encoded = encode(views_of(i)).float().cpu()
            latents[i] = encoded
            if path is not None:
                partial = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(encoded, partial)
                os.replace(partial, path)  # a reader never sees a half-written file
        if progress is not None:
            progress()
    if barrier is not None:
        barrier()
    for i in range(len(keys)):
        if i not in latents:
            latents[i] = torch.load(directory / keys[i], weights_only=True)
    thetas = [view_thetas(settings, i) for i in range(len(keys))]
    return LatentPairPool(settings, thetas, latents=[latents[i] for i in range(len(keys))])
