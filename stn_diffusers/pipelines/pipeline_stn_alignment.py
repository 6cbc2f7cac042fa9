"""`STNAlignmentPipeline`: align images in the latent space of a diffusers VAE."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging

from .. import geometry
from ..confidence import DEFAULT_CONFIDENCE_THRESHOLD, alignment_confidence
from ..content import content_weights
from ..images import (
    ASPECT_TOLERANCE,
    ImageInput,
    aspect_difference,
    format_size,
    pick,
    tensor_to_pil,
    to_mask_list,
    to_rgb_list,
)
from ..models.spatial_transformer import SpatialTransformer
from ..refine import REFINE_METHODS, import_cv2, motion_of, refine_theta_ecc
from .pipeline_output import STNAlignmentPipelineOutput

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Latents per side below which an input holds too little detail to align meaningfully (128 px at
# the Stable Diffusion VAE's factor 8). Such inputs are upsampled to the working size, with a warning.
MIN_LATENT_SIDE = 16


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short, stable identity of a VAE's weights: its parameter names and shapes, and the
    values of its first and last tensors (fp16, so a dtype change keeps the identity)."""
    state = vae.state_dict()
    digest = hashlib.sha256()
    digest.update(json.dumps([(name, list(t.shape)) for name, t in state.items()]).encode())
    names = list(state)
    for name in (names[0], names[-1]):
        digest.update(state[name].detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


# Stable Diffusion's pixels per latent cell, for a VAE whose config does not list its levels.
DEFAULT_VAE_SCALE_FACTOR = 8
# Latent cells by which an ignore mask's region is widened for the STN: a VAE encoder's receptive
# field spreads a changed region's content into the latents around it (the cells next to a pasted
# patch differ from the unchanged photo's), and those cells would pull the fit like the patch itself.
# On held-out pairs with 20 % replaced, 0 / 1 / 2 / 3 cells: STN alone 79 / 88 / 96 / 100 % under 5 px
# (benchmarks/RESULTS.md).
IGNORE_MASK_MARGIN = 3
# The widening applies only where it leaves at least this share of the reference's cells.
MIN_MARGIN_KEPT_SHARE = 0.1


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side (8 for Stable Diffusion's VAEs and ``AutoencoderTiny``)."""
    if hasattr(vae.config, "block_out_channels"):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    return DEFAULT_VAE_SCALE_FACTOR


def _to_channels_last(module: torch.nn.Module) -> None:
    """``module``'s 4-D weights in channels-last memory format, once (a no-op when they already are)."""
    weights = [p for p in module.parameters() if p.ndim == 4]
    if weights and not all(p.is_contiguous(memory_format=torch.channels_last) for p in weights):
        # Normal tensors even when first called under inference mode: the weights may train later.
        with torch.inference_mode(False), torch.no_grad():
            module.to(memory_format=torch.channels_last)


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of ``(B, 3, H, W)``; a no-op at the same size."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


class STNAlignmentPipeline(DiffusionPipeline):
    r"""Align a moving image onto a reference in the latent space of a VAE.

    The images are encoded with ``vae``; ``stn`` (a :class:`~stn_diffusers.SpatialTransformer`)
    estimates θ from the latents and warps them; the VAE decodes the aligned latents. θ lives in
    normalised coordinates, so the same θ also warps the original full-resolution input without
    any VAE loss (``warped_images``).

    Working size: both images are resized (antialiased) to one working size before encoding:
    ``height``/``width`` when given (multiples of the VAE factor), else for the seed design
    ``sample_size × factor`` square (512×512), else the reference's (or image's) aspect ratio with
    its longer side ``sample_size × factor`` (512), each side rounded down to a multiple of the
    VAE factor (8): a 1000×750 photo is encoded at 512×384. ``warped_images`` keep each input's
    own size. All inputs of one call share one working size, so an image whose aspect ratio differs
    from its reference's (beyond ``stn_diffusers.images.ASPECT_TOLERANCE``) is stretched, which reads
    as false motion: the call warns once; crop or pad such images to the reference's aspect. Inputs
    under ``MIN_LATENT_SIDE`` (16) latents on the shorter side (128 px at factor 8) warn too.

    Ignore mask: ``ignore_mask`` marks, in the reference frame, the pixels that must not be used to
    estimate the motion (white = ignore: an edited region, an object that moved). It has the
    reference's own size (it is drawn on the reference; a mask of another size is refused rather
    than stretched onto it) and the value rules of the inpainting masks (:mod:`stn_diffusers.inpainting`:
    binarised at half of full scale). The STN gives each latent cell the share of it that is kept
    (``reference_weights``, area average, the ignored region widened by ``IGNORE_MASK_MARGIN`` cells
    for the encoder's reach), and ECC refinement uses only the kept pixels. The correlation and
    search-refine designs weight cells; the seed design refuses a mask.

    Args:
        vae: a diffusers VAE with ``encode``/``decode`` (``AutoencoderKL``, ``AutoencoderTiny``).
        stn: the spatial transformer, trained in this VAE's latent space.

    Examples:
        ```py
        >>> from PIL import Image
        >>> from stn_diffusers import STNAlignmentPipeline

        >>> pipe = STNAlignmentPipeline.from_pretrained("path/to/pipeline")  # or stn_diffusers.load_default()
        >>> out = pipe(Image.open("moving.jpg"), reference=Image.open("reference.jpg"))
        >>> out.warped_images[0].save("aligned.png")  # full resolution, no VAE loss
        >>> out.theta  # (1, 2, 3), see stn_diffusers.geometry
        ```
    """

    model_cpu_offload_seq = "vae->stn"

    def __init__(self, vae, stn: SpatialTransformer):
        super().__init__()
        self.register_modules(vae=vae, stn=stn)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False)
        latent_channels = vae.config.latent_channels
        if stn.config.in_channels != latent_channels:
            raise ValueError(
                f"expected an stn with in_channels={latent_channels} (the VAE's latent_channels), "
                f"got {stn.config.in_channels}"
            )
        trained_for = stn.config.vae_fingerprint
        if trained_for is not None and trained_for != vae_fingerprint(vae):
            logger.warning(
                "This stn was trained in the latent space of another VAE (fingerprint %s, this one is %s): its θ "
                "will be unreliable. Fine-tune it for this VAE with `python -m stn_diffusers.finetune "
                "--pretrained_vae_name_or_path ...`.",
                trained_for,
                vae_fingerprint(vae),
            )

    # ------------------------------------------------------------------------------------ helpers
    def working_size(
        self, size: tuple[int, int], height: int | None = None, width: int | None = None
    ) -> tuple[int, int]:
        """The ``(height, width)`` images of size ``size = (H, W)`` are encoded at (see class docs)."""
        factor = self.vae_scale_factor
        config = self.stn.config
        if height is not None or width is not None:
            if height is None or width is None or height % factor or width % factor or min(height, width) <= 0:
                raise ValueError(
                    f"expected both height and width as positive multiples of {factor} (the VAE factor), "
                    f"got {height}×{width}"
                )
            return height, width
        longest = config.sample_size * factor
        if self.stn.fixed_sample_size is not None:
            return longest, longest
        minimum = self.stn.min_sample_size * factor
        scale = longest / max(size)
        return tuple(max(minimum, int(side * scale) // factor * factor) for side in size)

    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        sample_posterior: bool = False,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` → scaled latents ``(B, C, H/f, W/f)`` as diffusion models see them,
        encoded on ``device`` (default: the pipeline's execution device)."""
        images = images.to(device=device or self._execution_device, dtype=self.vae.dtype)
        if images.device.type == "cpu":
            # CPU convolutions run 1.5–3× faster on channels-last tensors (the embedded encoder: 99 →
            # 36 ms for two 512×512 images on one thread); the weights follow once, in place.
            encoder = getattr(self.vae, "encoder", None)
            if encoder is not None:
                _to_channels_last(encoder)
            images = images.contiguous(memory_format=torch.channels_last)
        encoded = self.vae.encode(images)
        if hasattr(encoded, "latent_dist"):
            distribution = encoded.latent_dist
            latents = distribution.sample(generator) if sample_posterior else distribution.mode()
        else:  # AutoencoderTiny and other deterministic encoders
            latents = encoded.latents
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * getattr(config, "scaling_factor", 1.0)

    def encode_images(
        self,
        images: list[torch.Tensor] | torch.Tensor,
        height: int,
        width: int,
        generator: torch.Generator | None = None,
        sample_posterior: bool = False,
        batch_size: int | None = None,
        progress_bar=None,
    ) -> torch.Tensor:
        """RGB images ``(3, H, W)`` in ``[0, 1]`` (a list, or a ``(B, 3, H, W)`` batch) → scaled latents
        ``(B, C, height/f, width/f)``, each resized (antialiased) to the working size first.

        The one encode path of the project (the pipeline, fine-tuning, evaluation and analysis):
        ``batch_size`` images go through the VAE at once (default: all); ``progress_bar`` (a tqdm bar)
        advances by one per chunk.
        """
        batch_size = batch_size or len(images)
        device = self._execution_device  # asked once: it walks the offload hooks of every component
        chunks = []
        for start in range(0, len(images), batch_size):
            chunk = torch.cat([_resize(image[None], height, width) for image in images[start : start + batch_size]])
            # [0, 1] → [-1, 1] as VaeImageProcessor.normalize maps them, in place: `cat` made a new tensor,
            # and the images were checked when converted (preprocess would check and copy them again).
            chunk = chunk.mul_(2).sub_(1)  # (b, 3, height, width)
            chunks.append(self.encode(chunk, generator, sample_posterior, device))
            if progress_bar is not None:
                progress_bar.update()
        return torch.cat(chunks)

    def predict_theta(
        self,
        latents: torch.Tensor,
        reference_latents: torch.Tensor | None = None,
        batch_size: int | None = None,
        progress_bar=None,
        reference_weights: torch.Tensor | None = None,
        moving_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """θ ``(B, 2, 3)`` float32 that aligns ``latents`` ``(B, C, h, w)`` onto ``reference_latents``.

        The one θ path of the project: ``batch_size`` pairs at a time (default: all), each chunk moved
        to the STN's device and dtype; ``progress_bar`` (a tqdm bar) advances by one per chunk. A
        reference is passed on only to an STN that looks at one, so callers never branch on
        ``conditioning``. ``reference_weights`` ``(B, 1, h, w)`` in ``[0, 1]`` (1 = use the cell) go to
        :meth:`SpatialTransformer.predict_theta`, and so do ``moving_weights`` ``(B, 1, h, w)`` (the
        latents' content, :meth:`content_weights`). Runs under the caller's grad mode.
        """
        batch_size = batch_size or latents.shape[0]
        uses_reference = self.stn.config.conditioning == "reference"
        if uses_reference and reference_latents is None:
            raise ValueError("expected reference_latents: this stn registers onto a reference")
        device, dtype = self.stn.device, self.stn.dtype
        thetas = []
        for start in range(0, latents.shape[0], batch_size):
            moving = latents[start : start + batch_size].to(device=device, dtype=dtype)
            reference = None
            if uses_reference:
                reference = reference_latents[start : start + batch_size].to(device=device, dtype=dtype)
            weights = {"reference_weights": reference_weights}
            if moving_weights is not None:  # only to an STN given some: only the search-refine design takes them
                weights["moving_weights"] = moving_weights
            weights = {
                name: None if value is None else value[start : start + batch_size].to(device=device, dtype=dtype)
                for name, value in weights.items()
            }
            thetas.append(self.stn.predict_theta(moving, reference, **weights).float())
            if progress_bar is not None:
                progress_bar.update()
        return torch.cat(thetas)

    def content_weights(
        self, images: list[torch.Tensor] | torch.Tensor, latent_size: tuple[int, int]
    ) -> torch.Tensor | None:
        """Which latent cells of each image ``(3, H, W)`` in ``[0, 1]`` hold picture content rather than
        the zero padding of an earlier warp: ``(B, 1, h, w)`` in ``{0, 1}`` at ``latent_size``, or
        ``None`` when no image has padding or the STN cannot use the weights
        (:func:`stn_diffusers.content.content_weights`). Any image size: the cells are area shares.
        """
        if not self.stn.supports_moving_weights:
            return None
        found = [content_weights(image[None].float(), latent_size) for image in images]
        if all(weights is None for weights in found):
            return None
        ones = torch.ones(1, 1, *latent_size)
        return torch.cat([ones if weights is None else weights for weights in found])

    def decode(self, latents: torch.Tensor, batch_size: int | None = None, progress_bar=None) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` → images ``(B, 3, h·f, w·f)`` in ``[-1, 1]``, ``batch_size`` at
        a time (default: all); ``progress_bar`` (a tqdm bar) advances by one per chunk."""
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        scale = getattr(config, "scaling_factor", 1.0)
        batch_size = batch_size or latents.shape[0]
        chunks = []
        for start in range(0, latents.shape[0], batch_size):
            chunk = latents[start : start + batch_size].to(self.vae.dtype) / scale + shift
            chunks.append(self.vae.decode(chunk).sample)
            if progress_bar is not None:
                progress_bar.update()
        return torch.cat(chunks)

    def _call_working_size(
        self,
        images: list[torch.Tensor] | None,
        references: list[torch.Tensor] | None,
        latents: torch.Tensor | None,
        height: int | None = None,
        width: int | None = None,
    ) -> tuple[int, int]:
        """The working ``(height, width)`` of one call: that of ``latents`` when given (what is still
        to encode must match them), else :meth:`working_size` of the reference (or the image)."""
        if latents is not None:
            return latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor
        source = references[0] if references is not None and self.stn.config.conditioning == "reference" else images[0]
        return self.working_size(tuple(source.shape[-2:]), height, width)

    def check_inputs(
        self,
        images: list[torch.Tensor] | None,
        references: list[torch.Tensor] | None,
        latents: torch.Tensor | None,
        reference_latents: torch.Tensor | None,
        height: int | None,
        width: int | None,
        output_type: str,
        min_displacement: float,
        batch_size: int,
        refine: str | None = None,
        decode: bool = True,
        ignore_masks: list[torch.Tensor] | None = None,
    ) -> None:
        """Raise ``ValueError`` naming the expected value for any bad input, before any encode.

        ``images`` and ``references`` are the inputs as lists of ``(3, H, W)`` tensors, ``ignore_masks``
        as a list of binary ``(1, H, W)`` (converting them checked each one's type, shape, channels and
        values), so counts, sizes and latent shapes can be checked.
        """
        if images is None and latents is None:
            raise ValueError("expected an image (or latents) to align, got neither")
        if ignore_masks is not None and not self.stn.supports_reference_weights:
            raise ValueError(
                f"expected ignore_mask=None for an stn with architecture={self.stn.config.architecture!r}: it "
                "regresses θ from the latents as a whole and cannot leave regions out; an stn with "
                "architecture='search_refine' (the registration preset) or 'correlation' can"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"expected output_type in {OUTPUT_TYPES}, got {output_type!r}")
        if min_displacement < 0:
            raise ValueError(f"expected min_displacement >= 0 pixels, got {min_displacement}")
        if int(batch_size) < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        if not isinstance(decode, bool):
            raise TypeError(f"expected decode to be True or False, got {decode!r}")
        needs_reference = self.stn.config.conditioning == "reference"
        if needs_reference and references is None and reference_latents is None:
            raise ValueError("expected a reference (or reference_latents): this stn registers onto a reference")
        if not needs_reference and references is not None and refine is None:
            logger.warning("This stn has conditioning='none': it ignores the reference.")
        channels = self.stn.config.in_channels
        for name, tensor in (("latents", latents), ("reference_latents", reference_latents)):
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or tensor.shape[1] != channels:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"expected {name} of shape (B, {channels}, h, w), got {shape}")
        if refine is not None and refine not in REFINE_METHODS:
            raise ValueError(f"expected refine in {(None, *REFINE_METHODS)}, got {refine!r}")
        if refine is not None and (images is None or references is None):
            raise ValueError(f"expected both image and reference with refine={refine!r}: it refines on their pixels")
        if refine == "ecc":
            import_cv2()  # fail before the encode, naming the extra to install

        num_images = len(images) if images is not None else latents.shape[0]
        if references is not None and len(references) not in (1, num_images):
            raise ValueError(f"expected 1 or {num_images} references (one per image), got {len(references)}")
        if latents is not None and latents.shape[0] != num_images:
            raise ValueError(
                f"expected latents with batch size {num_images} (the number of images), got {latents.shape[0]}"
            )
        if reference_latents is not None:
            work_height, work_width = self._call_working_size(images, references, latents, height, width)
            per_image = (channels, work_height // self.vae_scale_factor, work_width // self.vae_scale_factor)
            if reference_latents.shape[0] not in (1, num_images) or tuple(reference_latents.shape[1:]) != per_image:
                raise ValueError(
                    f"expected reference_latents of shape {(num_images, *per_image)} (the image latents') or "
                    f"{(1, *per_image)} (one shared), got {tuple(reference_latents.shape)}"
                )
        elif images is not None:
            self._call_working_size(images, references, latents, height, width)  # checks height and width
        if ignore_masks is not None:
            self._check_ignore_masks(ignore_masks, references, reference_latents, num_images)

    def _check_ignore_masks(
        self,
        masks: list[torch.Tensor],
        references: list[torch.Tensor] | None,
        reference_latents: torch.Tensor | None,
        num_images: int,
    ) -> None:
        """Named ``ValueError`` for ignore masks of the wrong count or size (each has its reference's
        size), or that ignore every pixel."""
        if len(masks) not in (1, num_images):
            raise ValueError(f"expected 1 or {num_images} ignore_masks (one per image), got {len(masks)}")
        names = [f"ignore_mask[{i}]" if len(masks) > 1 else "ignore_mask" for i in range(len(masks))]
        for name, mask in zip(names, masks):
            if bool(mask.min() >= 1):
                raise ValueError(
                    f"expected {name} to leave some pixels to estimate the motion from (black = use), "
                    "got a mask that ignores every pixel"
                )
        for i in range(num_images):
            mask = pick(masks, i)
            if references is not None:
                frame, what = tuple(pick(references, i).shape[-2:]), "its reference's size: masks are drawn on it"
            else:  # reference latents only: the working size they were encoded at
                frame = tuple(side * self.vae_scale_factor for side in reference_latents.shape[-2:])
                what = "the working size of reference_latents"
            if tuple(mask.shape[-2:]) != frame:
                raise ValueError(
                    f"expected {names[i if len(masks) > 1 else 0]} of size {format_size(frame)} ({what}), "
                    f"got {format_size(mask.shape[-2:])}"
                )

    def preprocess(
        self,
        images: list[torch.Tensor] | None,
        references: list[torch.Tensor] | None,
        latents: torch.Tensor | None,
        height: int | None,
        width: int | None,
    ) -> tuple[int, int]:
        """The working ``(height, width)`` of this call (see the class docs), with one warning each
        for inputs too small to align and for images whose aspect ratio differs from their
        reference's (both are resized to one working size, which stretches one of them)."""
        work_size = self._call_working_size(images, references, latents, height, width)
        uses_reference = self.stn.config.conditioning == "reference"
        to_encode = {"image": images if latents is None else None, "reference": references if uses_reference else None}
        named = [
            (f"{what}[{i}]" if len(items) > 1 else what, item)
            for what, items in to_encode.items()
            for i, item in enumerate(items or [])
        ]
        minimum = MIN_LATENT_SIDE * self.vae_scale_factor
        small = [f"{name} is {format_size(item.shape[-2:])}" for name, item in named if min(item.shape[-2:]) < minimum]
        if small:
            more = f" (and {len(small) - 3} more)" if len(small) > 3 else ""
            logger.warning(
                "%s%s: smaller than %d px on the shorter side, the least this VAE needs for %d latents per side. "
                "Too little detail to align: θ will be unreliable. Use larger images.",
                ", ".join(small[:3]), more, minimum, MIN_LATENT_SIDE,
            )  # fmt: skip
        if images is not None and references is not None and uses_reference:
            stretched = [
                i for i, image in enumerate(images)
                if aspect_difference(image.shape[-2:], pick(references, i).shape[-2:]) > ASPECT_TOLERANCE
            ]  # fmt: skip
            if stretched:
                first = stretched[0]
                if latents is not None:
                    chosen = "the latents' size"
                elif height is not None:
                    chosen = "the height and width given"
                elif self.stn.fixed_sample_size is not None:
                    chosen = "this stn's fixed input size"
                else:
                    chosen = f"the reference's aspect, longer side {max(work_size)}"
                logger.warning(
                    "%d of %d image(s) differ in aspect ratio from their reference by more than %d%% (%s is %s, "
                    "its reference %s): both are resized to one working size, %s (%s), which stretches the image "
                    "and reads as false motion. Crop or pad the image to the reference's aspect ratio.",
                    len(stretched), len(images), round(ASPECT_TOLERANCE * 100),
                    f"image[{first}]" if len(images) > 1 else "image",
                    format_size(images[first].shape[-2:]), format_size(pick(references, first).shape[-2:]),
                    format_size(work_size), chosen,
                )  # fmt: skip
        return work_size

    def _progress_bar(self, chunks: list[int]):
        """One bar over every chunk of the call's work, ``chunks`` counting the chunks of each step
        (encode, align, decode); shown only when a step takes more than one chunk, a do-nothing
        context otherwise."""
        if max(chunks) <= 1:
            return contextlib.nullcontext()
        return self.progress_bar(total=sum(chunks))

    def _refine_ecc(
        self,
        theta: torch.Tensor,
        images: list[torch.Tensor],
        references: list[torch.Tensor],
        refine_kwargs: dict | None = None,
        ignore_masks: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ ``(B, 2, 3)`` refined by ECC on the pixels (see :mod:`stn_diffusers.refine`), using only the
        reference pixels ``ignore_masks`` (1 = ignore) keep; ``(B,)`` bool, True where the refinement
        was accepted (elsewhere the STN's θ is kept); and the confidence ``(B,)`` of the returned θ.

        A refinement is accepted only on evidence: ECC's own test (it converged, raised the
        correlation and moved plausibly far), then the confidence of the refined θ
        (:func:`~stn_diffusers.confidence.alignment_confidence`) at least
        :data:`~stn_diffusers.confidence.DEFAULT_CONFIDENCE_THRESHOLD`. ECC converges somewhere on
        unrelated images too; the confidence says whether that somewhere aligns anything.
        """
        targets = references * len(images) if len(references) == 1 else references
        # ECC refines in the STN's own motion model (a homography STN: MOTION_HOMOGRAPHY) unless told otherwise.
        kwargs = {"motion": motion_of(theta), **(refine_kwargs or {})}
        if ignore_masks is not None:
            kwargs["reference_mask"] = [1.0 - mask for mask in ignore_masks]  # ECC's masks say what to use
        result = refine_theta_ecc(targets, images, theta.cpu(), **kwargs)
        refined_theta = result.theta.to(theta.device)
        confidence = alignment_confidence(targets, images, refined_theta.cpu(), ignore_masks)  # (B,)
        doubtful = result.converged & (confidence < DEFAULT_CONFIDENCE_THRESHOLD)
        refined = result.converged & ~doubtful
        if doubtful.any():
            refined_theta = torch.where(doubtful.view(-1, 1, 1).to(theta.device), theta, refined_theta)
            kept = alignment_confidence(targets, images, theta.cpu(), ignore_masks)
            confidence = torch.where(doubtful, kept, confidence)
        if not refined.all():
            failed = int((~refined).sum())
            logger.warning(
                "ECC refinement failed or was not supported by the evidence on %d of %d image(s); kept the "
                "STN's θ there.", failed, len(images),
            )  # fmt: skip
        return refined_theta, refined, confidence

    @staticmethod
    def _to_ignore_masks(ignore_mask: ImageInput | list[ImageInput]) -> list[torch.Tensor]:
        """``ignore_mask`` → a list of binary ``(1, H, W)`` float32 masks (1 = ignore), by the one set of
        mask rules (:func:`stn_diffusers.images.to_mask_tensor`)."""
        return to_mask_list(ignore_mask, "ignore_mask")

    @staticmethod
    def _reference_weights(ignore_masks: list[torch.Tensor], num_images: int, latent_size: tuple[int, int]):
        """Ignore masks ``(1, H, W)`` (1 = ignore) → the STN's ``reference_weights`` ``(B, 1, h, w)``
        (1 = use): the kept share of each latent cell, by area average, so a cell half covered by the
        mask counts half, then the ignored region widened by :data:`IGNORE_MASK_MARGIN` cells. θ is
        normalised, so the mask maps onto the latent grid by this resize alone."""
        kept = torch.cat([F.interpolate(1.0 - mask[None], size=latent_size, mode="area") for mask in ignore_masks])
        margin = IGNORE_MASK_MARGIN
        # A cell keeps the least kept share within `margin` cells (the padding of max_pool2d never wins).
        eroded = -F.max_pool2d(-kept, 2 * margin + 1, stride=1, padding=margin)
        # A mask that leaves only a sliver keeps its own cells rather than none.
        enough = eroded.flatten(1).mean(dim=1) >= MIN_MARGIN_KEPT_SHARE
        kept = torch.where(enough.view(-1, 1, 1, 1), eroded, kept)
        return kept.expand(num_images, -1, -1, -1) if len(ignore_masks) == 1 else kept  # (B, 1, h, w)

    def _hold_small_motions(
        self, theta: torch.Tensor, pixel_sizes: list[tuple[int, int]], min_displacement: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """θ ``(B, 2, 3)`` or ``(B, 3, 3)`` set to the identity where its mean corner motion at
        ``pixel_sizes[i] = (H, W)`` is below ``min_displacement`` pixels; returns
        ``(theta, displacement (B,), unwarped (B,) bool)``. An exact identity (the registration design
        keeps aligned pairs there) is unwarped at any ``min_displacement``, the default 0 included:
        the input comes back untouched rather than resampled in place."""
        identity = geometry.identity_theta(theta.shape[0], theta.device)
        if geometry.is_homography(theta):
            identity = geometry.to_homogeneous(identity)  # (B, 3, 3), the shape of θ
        displacement = torch.stack([
            geometry.corner_error(theta[i : i + 1], identity[i : i + 1], *size)[0] for i, size in enumerate(pixel_sizes)
        ])  # fmt: skip
        unwarped = (displacement < min_displacement) | (displacement == 0)
        return torch.where(unwarped.view(-1, 1, 1), identity, theta), displacement, unwarped

    def _warp_originals(
        self, images: list[torch.Tensor], theta: torch.Tensor, unwarped: torch.Tensor, output_type: str
    ):
        """Each ``(3, H, W)`` input warped by its θ at its own size (bicubic, no VAE loss), in ``output_type``."""
        warped = []
        for i, original in enumerate(images):
            if not unwarped[i]:
                original = geometry.warp(original[None], theta[i : i + 1].cpu(), mode="bicubic")[0].clamp(0, 1)
            warped.append(original)
        return self._postprocess_originals(warped, output_type)

    def _postprocess_originals(self, images: list[torch.Tensor], output_type: str):
        if output_type == "pil":
            return [tensor_to_pil(image) for image in images]
        same_size = len({tuple(image.shape) for image in images}) == 1
        if output_type == "pt":
            return torch.stack(images) if same_size else images
        arrays = [image.permute(1, 2, 0).numpy() for image in images]
        return np.stack(arrays) if same_size else arrays

    # --------------------------------------------------------------------------------------- call
    # Inference mode rather than no_grad: nothing here trains, and tensors made in it skip autograd's
    # version counting. Its tensors cannot join autograd later: callers clone() an output to do so.
    @torch.inference_mode()
    def __call__(
        self,
        image: ImageInput | list[ImageInput] | None = None,
        reference: ImageInput | list[ImageInput] | None = None,
        *,
        latents: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        sample_posterior: bool = False,
        min_displacement: float = 0.0,
        batch_size: int = 8,
        refine: str | None = None,
        refine_kwargs: dict | None = None,
        decode: bool = True,
        ignore_mask: ImageInput | list[ImageInput] | None = None,
        ignore_padding: bool = True,
    ) -> STNAlignmentPipelineOutput | tuple:
        r"""Align ``image`` onto ``reference``.

        Args:
            image: the moving image(s): PIL, numpy, torch or a list (see ``stn_diffusers.images``).
            reference: the reference image(s); one reference is shared by every image. Required when
                ``stn.config.conditioning == "reference"``.
            latents, reference_latents (`torch.Tensor` of shape `(B, C, h, w)`): already encoded and
                scaled latents; skip the encode (workflows that hold SD latents).
            height, width: the working size (see the class docs).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (no decode, no pixel warp: θ and
                the aligned latents only).
            return_dict: return a :class:`STNAlignmentPipelineOutput` rather than a tuple.
            generator: used only with ``sample_posterior=True``.
            sample_posterior: sample the VAE posterior instead of taking its mode.
            min_displacement: pixels; when the estimated mean corner motion of an input is below
                it, the input is returned unwarped (θ = identity) and flagged in ``unwarped``, so
                aligned images are never resampled for nothing.
            batch_size: pairs encoded, aligned and decoded at once (each VAE encode holds the images
                and their references together); a progress bar shows above one batch.
            refine: ``None`` or ``"ecc"``: refine each θ with OpenCV's ECC on the original images,
                started from the STN's θ (needs ``pip install "stn-diffusers[opencv]"`` and the images,
                not only latents). Where ECC fails, or the refined θ's confidence is below
                :data:`~stn_diffusers.confidence.DEFAULT_CONFIDENCE_THRESHOLD` (ECC converged on
                something that aligns nothing), the STN's θ is kept and ``refined`` is False.
            refine_kwargs: keyword arguments of :func:`stn_diffusers.refine.refine_theta_ecc`
                (``levels``, ``iterations``, ``epsilon``, ``max_side``, ``max_correction``).
            decode: ``False`` skips the VAE decoder: ``images`` is ``None`` and only the pixel warp
                (``warped_images``) is returned, in ``output_type``; what ``stn-diffusers align`` writes.
            ignore_mask: the reference pixels not to use for estimating the motion (white = ignore), one
                mask for every image or one per image, each at its reference's size; PIL, numpy or torch
                with the inpainting masks' value rules (see the class docs). The STN weights its cells by
                the share kept and ECC uses only kept pixels; the registration designs only
                (``architecture="search_refine"`` or ``"correlation"``), not the seed design.
            ignore_padding: zero padding in the images (exactly black regions that touch the border, as
                an earlier rotation or zoom-out leaves) is not matched as picture content; the
                search-refine design only, and only for images given as pixels.

        Returns:
            :class:`STNAlignmentPipelineOutput`, or with ``return_dict=False`` the tuple of its fields in
            order: ``(images, warped_images, theta, latents, displacement, unwarped, refined)``. Its tensors
            are made under ``torch.inference_mode()``: ``clone()`` one to use it with autograd or to
            change it in place.
        """
        # 1. Check inputs (on RGB lists: converting them checks each image's type, shape and values)
        uses_reference = self.stn.config.conditioning == "reference"
        originals = to_rgb_list(image, "image") if image is not None else None
        references = to_rgb_list(reference, "reference") if reference is not None else None
        ignore_masks = self._to_ignore_masks(ignore_mask) if ignore_mask is not None else None
        self.check_inputs(
            originals, references, latents, reference_latents, height, width, output_type, min_displacement,
            batch_size, refine, decode, ignore_masks,
        )  # fmt: skip
        num_images = len(originals) if originals is not None else latents.shape[0]
        decoding = decode and output_type != "latent"

        # 2. Preprocess: the working size (images are resized to it as they are encoded)
        work_height, work_width = self.preprocess(originals, references, latents, height, width)

        # Images and references share the working size, so they are encoded together, each VAE call
        # taking `batch_size` pairs' worth of them (rounded up when one reference is shared by all).
        images_to_encode = originals if latents is None else []
        references_to_encode = references if uses_reference and reference_latents is None else []
        to_encode = images_to_encode + references_to_encode
        encode_batch = max(1, math.ceil(batch_size * len(to_encode) / num_images))
        pair_chunks = math.ceil(num_images / batch_size)
        chunks = [math.ceil(len(to_encode) / encode_batch), pair_chunks, pair_chunks if decoding else 0]
        with self._progress_bar(chunks) as progress:
            # 3. Encode what was not given as latents
            if to_encode:
                encoded = self.encode_images(
                    to_encode, work_height, work_width, generator, sample_posterior, encode_batch, progress
                )  # (images + references, C, h, w)
                if images_to_encode:
                    latents = encoded[:num_images]  # (B, C, h, w)
                if references_to_encode:
                    reference_latents = encoded[len(images_to_encode) :]  # (1 or B, C, h, w)
            if reference_latents is not None and reference_latents.shape[0] == 1 and num_images > 1:
                reference_latents = reference_latents.expand(num_images, -1, -1, -1)  # one shared reference

            # 4. Align (an ignore mask weights the reference's latent cells and ECC's pixels)
            latent_size = tuple(latents.shape[-2:])
            reference_weights = moving_weights = None
            if ignore_masks is not None:
                reference_weights = self._reference_weights(ignore_masks, num_images, latent_size)
            if ignore_padding and originals is not None and images_to_encode:
                moving_weights = self.content_weights(originals, latent_size)  # (B, 1, h, w) or None
            theta = self.predict_theta(
                latents, reference_latents, batch_size, progress, reference_weights, moving_weights
            )  # (B, 2, 3)
            refined = judged = None
            if refine == "ecc":
                theta, refined, judged = self._refine_ecc(theta, originals, references, refine_kwargs, ignore_masks)
            if originals is not None:
                pixel_sizes = [tuple(original.shape[-2:]) for original in originals]
            else:
                pixel_sizes = [(work_height, work_width)] * num_images
            held = theta
            theta, displacement, unwarped = self._hold_small_motions(theta, pixel_sizes, min_displacement)
            confidence = None
            if originals is not None and references is not None:  # judged on the pixels, ignored ones left out
                if judged is not None and torch.equal(held, theta):
                    confidence = judged  # the θ ECC's acceptance was judged on: already measured
                else:
                    confidence = alignment_confidence(references, originals, theta.cpu(), ignore_masks)  # (B,)
            aligned_latents = geometry.warp(
                latents.float(), theta.to(latents.device), padding_mode=self.stn.config.padding_mode
            ).to(latents.dtype)

            # 5. Decode (never for the latents or the pixel warp alone)
            decoded = None
            if decoding:
                decoded = self.decode(aligned_latents, batch_size, progress)  # (B, 3, h·f, w·f) in [-1, 1]

        # 6. Postprocess
        images = warped_images = None
        if decoded is not None:
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)
        if originals is not None and output_type != "latent":
            warped_images = self._warp_originals(originals, theta, unwarped, output_type)

        self.maybe_free_model_hooks()
        output = STNAlignmentPipelineOutput(
            images=images,
            warped_images=warped_images,
            theta=theta,
            latents=aligned_latents,
            displacement=displacement,
            unwarped=unwarped,
            refined=refined,
            confidence=confidence,
        )
        if not return_dict:
            # Every field in dataclass order; BaseOutput.to_tuple() would drop the ones that are None.
            return tuple(getattr(output, field.name) for field in dataclasses.fields(output))
        return output
