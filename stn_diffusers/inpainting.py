"""Inpainting preprocessing: align an image and its mask to a reference before Stable Diffusion inpainting.

Inpainting goes wrong when the image to repaint and the frame the mask was drawn on are out of
register (a mask drawn on one shot, a second shot a moment later; a slightly rotated scan). This
module estimates θ with an :class:`~stn_diffusers.STNAlignmentPipeline` (in the latent space of the
inpainting pipeline's own VAE), then warps the full-resolution pixels, never a VAE round trip:

- :func:`prepare_inpainting_inputs` returns an image and a mask, both in the reference frame, that
  ``StableDiffusionInpaintPipeline`` (or any inpainting tool) accepts as they are;
- :class:`STNInpaintPipeline` holds the components of ``StableDiffusionInpaintPipeline`` plus ``stn``,
  aligns, inpaints through ``StableDiffusionInpaintPipeline.__call__`` and can warp the result back.

Frames and sizes:
    The output frame is the reference's: every returned image and mask has the reference's size
    ``(H_ref, W_ref)``. With ``mask_frame="reference"`` the mask was drawn on the reference; it is
    resized (nearest neighbour) to the reference's size when it differs and is otherwise used as is.
    With ``mask_frame="image"`` the mask was drawn on the image; it is resized (nearest neighbour) to
    the image's size, then warped with the image. A mask whose aspect ratio differs from its frame's
    (beyond :data:`~stn_diffusers.images.ASPECT_TOLERANCE`) is stretched by that resize, with a
    warning. The image itself is warped at its own full resolution straight into the
    ``H_ref × W_ref`` reference frame (θ is in normalised coordinates, see
    :mod:`stn_diffusers.geometry`), bicubic, zero padding.

Masks (diffusers' convention: white = repaint):
    A PIL image of any single-band mode (``1``, ``L``, ``P``, ``I``, ``F``...) or ``RGB``, upright by
    its EXIF orientation like every image; a numpy array ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``,
    or a tensor ``(H, W)``, ``(1|3, H, W)`` or ``(B, 1|3, H, W)``, with the values of
    :mod:`stn_diffusers.images` (``uint8`` 0–255 and ``uint16`` 0–65535 full scale, ``bool``, float
    in ``[0, 1]``), for numpy and torch alike. An integer mask holding only 0 and 1 is rejected: at
    full scale it would be empty (pass it as ``bool``). Three channels are converted to grey (their
    mean; PIL's ``convert("L")`` for PIL images). Two or four channels are rejected: an alpha band
    makes it ambiguous which band is the mask. Grey values are binarised at :data:`MASK_THRESHOLD` =
    0.5 of full scale (``>= 0.5`` → repaint), the threshold ``StableDiffusionInpaintPipeline`` uses.
    Masks are resized and warped with nearest-neighbour sampling, so they stay binary.

Exposed border:
    Where the warp samples outside the image (no source pixels) the aligned image is black padding.
    With ``fill_exposed=True`` that border (``1 - geometry.valid_mask(θ)``) is added to the mask so
    the inpainting model paints it instead of keeping the padding.

Ignore mask (what the alignment does not look at):
    The region being repainted often differs between the two shots (that is why it is repainted), and
    it must not pull the estimate. By default (``ignore_mask=None``), a mask drawn on the reference
    (``mask_frame="reference"``) is also the alignment's ignore mask
    (:class:`~stn_diffusers.STNAlignmentPipeline`'s ``ignore_mask``): those reference pixels do not
    vote. A mask drawn on the image is not: it is in the image's frame, which θ has yet to map onto
    the reference, so by default nothing is ignored there. Nor is a mask that covers the whole
    reference (nothing would be left to align on), nor anything with an STN that cannot weight cells
    (``architecture="seed"``). ``ignore_mask=False`` turns the default off; a mask of its own (in the
    reference frame, at the reference's size, white = ignore) replaces it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AsymmetricAutoencoderKL,
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from . import geometry
from .images import (  # the mask conversion lives with the image conversion; re-exported here
    ASPECT_TOLERANCE,
    MASK_THRESHOLD,  # noqa: F401 (re-exported: part of this module's API)
    ImageInput,
    aspect_difference,
    format_size,
    mask_to_pil,  # noqa: F401 (re-exported)
    open_image,
    pick,
    to_mask_list,
    to_mask_tensor,  # noqa: F401 (re-exported)
    to_rgb_list,
)
from .models.spatial_transformer import SpatialTransformer
from .pipelines.pipeline_stn_alignment import STNAlignmentPipeline

logger = logging.get_logger(__name__)

MASK_FRAMES = ("reference", "image")
OUTPUT_TYPES = ("pil", "np", "pt")
# The components StableDiffusionInpaintPipeline is built from, in its constructor's order.
INPAINT_COMPONENTS = (
    "vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor", "image_encoder",
)  # fmt: skip


@dataclass
class InpaintingInputs(BaseOutput):
    """Inputs for an inpainting pipeline, aligned into the reference frame.

    Attributes:
        image (`torch.Tensor` of shape `(B, 3, H_ref, W_ref)`): the image warped into the reference
            frame at full resolution, in ``[0, 1]``.
        mask_image (`torch.Tensor` of shape `(B, 1, H_ref, W_ref)`): the binary mask (1 = repaint)
            in the reference frame, including the exposed border when ``fill_exposed=True``.
        theta (`torch.Tensor` of shape `(B, 2, 3)`): the θ that maps the reference frame to the image
            (see :mod:`stn_diffusers.geometry`).
        exposed_mask (`torch.Tensor` of shape `(B, 1, H_ref, W_ref)`): 1 where the warp has no source
            pixels (the exposed border), whether or not it was added to the mask.
    """

    image: torch.Tensor
    mask_image: torch.Tensor
    theta: torch.Tensor
    exposed_mask: torch.Tensor


@dataclass
class STNInpaintPipelineOutput(BaseOutput):
    """Output of :class:`STNInpaintPipeline`.

    Attributes:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the inpainted images: in the
            reference frame at the reference's size, or with ``warp_back=True`` in each image's own
            frame at its own size. Lists where sizes differ.
        theta (`torch.Tensor` of shape `(B, 2, 3)`): reference frame → image (see :mod:`stn_diffusers.geometry`).
        mask_image (`torch.Tensor` of shape `(B, 1, H_ref, W_ref)`): the binary mask handed to the
            inpainting pipeline (1 = repaint), in the reference frame.
        exposed_mask (`torch.Tensor` of shape `(B, 1, H_ref, W_ref)`): the exposed border of the warp.
        nsfw_content_detected (`list[bool]` or `None`): the safety checker's flags, when it ran.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    theta: torch.Tensor
    mask_image: torch.Tensor
    exposed_mask: torch.Tensor
    nsfw_content_detected: list[bool] | None = None


# ------------------------------------------------------------------------------------------- masks
def load_mask(path: str | os.PathLike) -> PIL.Image.Image:
    """Open a mask file upright, its mode kept (unlike :func:`stn_diffusers.images.load_image`)."""
    return open_image(path, "mask image")


def _resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(1, H, W)`` (keeps the mask binary); a no-op at the same size."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[None], size=size, mode="nearest-exact")[0]


# ---------------------------------------------------------------------------------- preprocessing
def _warn_if_masks_stretched(
    masks: list[torch.Tensor], images: list[torch.Tensor], frame_size: tuple[int, int], mask_frame: str
) -> None:
    """One warning when masks differ in aspect ratio from the frame they were drawn on (the reference
    of ``frame_size``, or their image): resizing them onto it stretches them off what they cover."""
    frames = [frame_size if mask_frame == "reference" else tuple(image.shape[-2:]) for image in images]
    stretched = [
        i for i, frame in enumerate(frames)
        if aspect_difference(tuple(pick(masks, i).shape[-2:]), frame) > ASPECT_TOLERANCE
    ]  # fmt: skip
    if stretched:
        first = stretched[0]
        logger.warning(
            "%d of %d mask(s) differ in aspect ratio from the %s they were drawn on by more than %d%% (mask %s, "
            "%s %s): the mask is resized (nearest neighbour) to the %s's size, which stretches it off what it "
            "covers. Crop or pad the mask to the %s's aspect ratio.",
            len(stretched), len(frames), mask_frame, round(ASPECT_TOLERANCE * 100),
            format_size(pick(masks, first).shape[-2:]), mask_frame, format_size(frames[first]), mask_frame, mask_frame,
        )  # fmt: skip


def prepare_inpainting_inputs(
    aligner: STNAlignmentPipeline,
    image: ImageInput | list[ImageInput],
    mask_image: ImageInput | list[ImageInput],
    reference: ImageInput | list[ImageInput],
    *,
    mask_frame: str = "reference",
    fill_exposed: bool = True,
    generator: torch.Generator | None = None,
    align_kwargs: dict | None = None,
    ignore_mask: ImageInput | list[ImageInput] | bool | None = None,
) -> InpaintingInputs:
    r"""Align ``image`` (and with ``mask_frame="image"`` its mask) into the frame of ``reference``.

    Args:
        aligner: the :class:`~stn_diffusers.STNAlignmentPipeline` that estimates θ (share the inpainting
            pipeline's VAE: ``STNAlignmentPipeline(vae=inpaint_pipe.vae, stn=stn)``).
        image: the image(s) to repaint; PIL, numpy, torch or a list (see :mod:`stn_diffusers.images`).
        mask_image: one mask for every image, or one per image (see the module docs; white = repaint).
        reference: the frame to align into; one for every image, or one per image, all of one size.
        mask_frame: ``"reference"`` when the mask was drawn on the reference (only the image is warped),
            ``"image"`` when it was drawn on the image (mask and image are warped together).
        fill_exposed: add the border the warp exposes (no source pixels) to the mask.
        generator: passed to the aligner (used when it samples the VAE posterior).
        align_kwargs: further keyword arguments of the aligner's ``__call__`` (``refine="ecc"``,
            ``min_displacement``, ``height``, ``width``...).
        ignore_mask: the reference pixels the alignment must not use (white = ignore). ``None``: the
            default of the module docs (the mask itself, when drawn on the reference); ``False``: none;
            or a mask (one, or one per image) at the reference's size.

    Returns:
        :class:`InpaintingInputs` with tensors at the reference's size ``(H_ref, W_ref)``; pass
        ``image`` and ``mask_image`` to ``StableDiffusionInpaintPipeline`` as they are.
    """
    # 1. Check inputs
    if mask_frame not in MASK_FRAMES:
        raise ValueError(f"expected mask_frame in {MASK_FRAMES}, got {mask_frame!r}")
    if reference is None:
        raise ValueError("expected a reference: the image and mask are aligned into its frame")
    images = to_rgb_list(image, "image")
    masks = to_mask_list(mask_image, "mask_image")
    references = to_rgb_list(reference, "reference")
    num_images = len(images)
    for name, items in (("mask_image", masks), ("reference", references)):
        if len(items) not in (1, num_images):
            raise ValueError(f"expected 1 or {num_images} {name}s (one per image), got {len(items)}")
    reference_sizes = {tuple(r.shape[-2:]) for r in references}
    if len(reference_sizes) != 1:
        raise ValueError(f"expected references of one size (the output frame), got sizes {sorted(reference_sizes)}")
    frame_size = reference_sizes.pop()  # (H_ref, W_ref)
    _warn_if_masks_stretched(masks, images, frame_size, mask_frame)
    if ignore_mask is True or "ignore_mask" in (align_kwargs or {}):
        raise ValueError(
            "expected ignore_mask as None (the default), False (none) or a mask, passed to "
            f"prepare_inpainting_inputs itself, got {'True' if ignore_mask is True else 'it in align_kwargs'}"
        )
    if ignore_mask is None:
        ignore_mask = _default_ignore_masks(aligner, masks, frame_size, mask_frame)
    elif ignore_mask is False:
        ignore_mask = None

    # 2. Estimate θ (latent space; no decode), the ignored reference pixels left out
    aligned = aligner(
        images, reference=references, output_type="latent", generator=generator, ignore_mask=ignore_mask,
        **(align_kwargs or {}),
    )  # fmt: skip
    theta = aligned.theta.float().cpu()  # (B, 2, 3)

    # 3. Warp the full-resolution pixels into the reference frame
    exposed = 1.0 - geometry.valid_mask(theta, *frame_size)  # (B, 1, H_ref, W_ref)
    warped_images, warped_masks = [], []
    for i, original in enumerate(images):
        theta_i = theta[i : i + 1]
        warped = geometry.warp(original[None], theta_i, size=frame_size, mode="bicubic")  # (1, 3, H_ref, W_ref)
        warped_images.append(warped[0].clamp(0, 1))
        mask = pick(masks, i)
        if mask_frame == "reference":
            warped_masks.append(_resize_mask(mask, frame_size))
        else:
            mask = _resize_mask(mask, tuple(original.shape[-2:]))
            warped_masks.append(geometry.warp(mask[None], theta_i, size=frame_size, mode="nearest")[0])
    mask = torch.stack(warped_masks)  # (B, 1, H_ref, W_ref), binary
    if fill_exposed:
        mask = torch.maximum(mask, exposed)
    return InpaintingInputs(image=torch.stack(warped_images), mask_image=mask, theta=theta, exposed_mask=exposed)


def _default_ignore_masks(
    aligner: STNAlignmentPipeline, masks: list[torch.Tensor], frame_size: tuple[int, int], mask_frame: str
) -> list[torch.Tensor] | None:
    """The default ignore masks (see the module docs): the masks drawn on the reference, at its size,
    for an STN that can weight cells; ``None`` otherwise. A mask covering the whole reference ignores
    nothing: the alignment needs some pixels, and it matters little where everything is repainted."""
    if mask_frame != "reference" or not aligner.stn.supports_reference_weights:
        return None
    resized = [_resize_mask(mask, frame_size) for mask in masks]
    usable = [mask if bool(mask.min() < 1) else torch.zeros_like(mask) for mask in resized]
    return usable if any(bool(mask.any()) for mask in usable) else None


# ---------------------------------------------------------------------------------------- pipeline
class STNInpaintPipeline(DiffusionPipeline):
    r"""Align an image and its mask to a reference, then inpaint with ``StableDiffusionInpaintPipeline``.

    Holds the components of ``StableDiffusionInpaintPipeline`` plus ``stn``. θ is estimated in the
    latent space of the inpainting VAE (one VAE, shared: build it with :meth:`from_pipe`), the image
    and mask are warped at full resolution into the reference frame (:func:`prepare_inpainting_inputs`)
    and inpainted by ``StableDiffusionInpaintPipeline.__call__`` itself, built on these same components.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler, safety_checker, feature_extractor, image_encoder:
            as in ``StableDiffusionInpaintPipeline``; ``tokenizer`` may be ``None`` when prompts come as
            ``prompt_embeds`` and ``negative_prompt_embeds``.
        stn: a :class:`~stn_diffusers.SpatialTransformer` trained in this VAE's latent space.

    Examples:
        ```py
        >>> from diffusers import StableDiffusionInpaintPipeline
        >>> from stn_diffusers import STNInpaintPipeline, load_default

        >>> inpaint = StableDiffusionInpaintPipeline.from_pretrained("path/to/sd-inpainting")
        >>> pipe = STNInpaintPipeline.from_pipe(inpaint, stn=load_default().stn)  # shares the VAE, the UNet...
        >>> out = pipe("a red door", image=photo, mask_image=mask, reference_image=reference, warp_back=True)
        >>> out.images[0], out.theta, out.mask_image
        ```
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae->stn"
    _optional_components = ["safety_checker", "feature_extractor", "image_encoder", "tokenizer"]
    _exclude_from_cpu_offload = ["safety_checker"]

    def __init__(
        self,
        vae: AutoencoderKL | AsymmetricAutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        safety_checker: StableDiffusionSafetyChecker,
        feature_extractor: CLIPImageProcessor,
        stn: SpatialTransformer,
        image_encoder: CLIPVisionModelWithProjection = None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=safety_checker, feature_extractor=feature_extractor, stn=stn, image_encoder=image_encoder,
        )  # fmt: skip
        self.register_to_config(requires_safety_checker=requires_safety_checker)
        if unet is not None and unet.config.in_channels != 9:
            logger.warning(
                "This unet has in_channels=%d, not 9: it is not an inpainting UNet, and "
                "StableDiffusionInpaintPipeline will blend the masked latents instead.",
                unet.config.in_channels,
            )

    @property
    def aligner(self) -> STNAlignmentPipeline:
        """An :class:`~stn_diffusers.STNAlignmentPipeline` on this pipeline's own ``vae`` and ``stn``."""
        aligner = STNAlignmentPipeline(vae=self.vae, stn=self.stn)
        aligner.set_progress_bar_config(disable=True)
        return aligner

    @property
    def inpaint_pipeline(self) -> StableDiffusionInpaintPipeline:
        """``StableDiffusionInpaintPipeline`` on this pipeline's own components (shared, not copied)."""
        components = {name: getattr(self, name, None) for name in INPAINT_COMPONENTS}
        # The safety-checker warning, if due, was given when these components were first assembled.
        pipe = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    def check_inputs(
        self, image, mask_image, reference_image, output_type, warp_back, overlay_unmasked, inpaint_kwargs
    ) -> None:
        """Raise ``ValueError``/``TypeError`` naming the expected value for any bad argument, before
        the alignment (the image and mask formats are checked as they are converted)."""
        for name, value in (("image", image), ("mask_image", mask_image), ("reference_image", reference_image)):
            if value is None:
                raise ValueError(f"expected {name}, got None")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"expected output_type in {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(warp_back, bool) or not isinstance(overlay_unmasked, bool):
            raise TypeError(
                f"expected warp_back and overlay_unmasked as bools, got {warp_back!r} and {overlay_unmasked!r}"
            )
        for reserved in ("output_type", "return_dict", "masked_image_latents"):
            if reserved in inpaint_kwargs:
                raise ValueError(f"expected no {reserved!r} among the inpainting arguments: this pipeline sets it")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageInput | list[ImageInput] | None = None,
        mask_image: ImageInput | list[ImageInput] | None = None,
        reference_image: ImageInput | list[ImageInput] | None = None,
        *,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        mask_frame: str = "reference",
        fill_exposed: bool = True,
        warp_back: bool = False,
        overlay_unmasked: bool = False,
        align_kwargs: dict | None = None,
        ignore_mask: ImageInput | list[ImageInput] | bool | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **inpaint_kwargs,
    ) -> STNInpaintPipelineOutput | tuple:
        r"""Align ``image`` and ``mask_image`` to ``reference_image``, inpaint, optionally warp back.

        Args:
            prompt, prompt_embeds, negative_prompt_embeds: as in ``StableDiffusionInpaintPipeline``.
            image: the image(s) to repaint.
            mask_image: white = repaint; see :mod:`stn_diffusers.inpainting` for formats and binarisation.
            reference_image: the frame to align into (and the output size without ``warp_back``).
            mask_frame, fill_exposed, align_kwargs, ignore_mask: see :func:`prepare_inpainting_inputs`
                (by default, a mask drawn on the reference is left out of the alignment).
            warp_back: warp the inpainted result back into each image's own frame and size; where the
                reference frame does not cover the image, the image's own pixels are kept.
            overlay_unmasked: paste the aligned image's pixels over the un-masked area of the result
                (before any warp back), so only the masked area carries the VAE and diffusion changes.
            generator: passed to the inpainting pipeline (and to the aligner).
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict: return a :class:`STNInpaintPipelineOutput` rather than a tuple.
            **inpaint_kwargs: any other argument of ``StableDiffusionInpaintPipeline.__call__``
                (``num_inference_steps``, ``guidance_scale``, ``strength``, ``negative_prompt``...).
                With ``num_images_per_prompt = n`` result ``j`` belongs to input ``j mod B``, the order
                in which diffusers repeats the images.

        Returns:
            :class:`STNInpaintPipelineOutput` or the tuple ``(images, theta, mask_image, nsfw_content_detected)``.
        """
        # 1. Check inputs
        self.check_inputs(image, mask_image, reference_image, output_type, warp_back, overlay_unmasked, inpaint_kwargs)

        # 2. Align image and mask into the reference frame (pixel warps at full resolution)
        inputs = prepare_inpainting_inputs(
            self.aligner, image, mask_image, reference_image, mask_frame=mask_frame, fill_exposed=fill_exposed,
            generator=generator if isinstance(generator, torch.Generator) else None, align_kwargs=align_kwargs,
            ignore_mask=ignore_mask,
        )  # fmt: skip
        frame_size = tuple(inputs.image.shape[-2:])

        # 3. Inpaint with StableDiffusionInpaintPipeline's own __call__
        result = self.inpaint_pipeline(
            prompt=prompt, image=inputs.image, mask_image=inputs.mask_image, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, generator=generator, output_type="pt", return_dict=True,
            **inpaint_kwargs,
        )  # fmt: skip
        inpainted = result.images.float().cpu()  # (N, 3, h, w) in [0, 1], h and w rounded down to the VAE factor
        if tuple(inpainted.shape[-2:]) != frame_size:
            inpainted = F.interpolate(inpainted, size=frame_size, mode="bicubic", align_corners=False).clamp(0, 1)

        # 4. Postprocess: overlay, warp back
        num_inputs = inputs.theta.shape[0]
        originals = to_rgb_list(image, "image") if warp_back else None
        outputs = []
        for j, result_j in enumerate(inpainted):
            i = j % num_inputs
            if overlay_unmasked:
                keep = 1.0 - inputs.mask_image[i]
                result_j = keep * inputs.image[i] + (1.0 - keep) * result_j
            if warp_back:
                result_j = self.warp_to_image_frame(result_j, inputs.theta[i : i + 1], originals[i])
            outputs.append(result_j)
        images = self.aligner._postprocess_originals(outputs, output_type)  # PIL, (N, H, W, 3) or (N, 3, H, W)

        self.maybe_free_model_hooks()
        nsfw = result.nsfw_content_detected
        if not return_dict:
            return (images, inputs.theta, inputs.mask_image, nsfw)
        return STNInpaintPipelineOutput(
            images=images, theta=inputs.theta, mask_image=inputs.mask_image, exposed_mask=inputs.exposed_mask,
            nsfw_content_detected=nsfw,
        )  # fmt: skip

    @staticmethod
    def warp_to_image_frame(aligned: torch.Tensor, theta: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """Warp ``aligned`` ``(3, H_ref, W_ref)`` from the reference frame back into the frame of
        ``original`` ``(3, H, W)`` by ``invert_theta(theta)`` (``theta``: ``(1, 2, 3)``), keeping
        ``original``'s pixels where the reference frame does not reach. Returns ``(3, H, W)``."""
        size = tuple(original.shape[-2:])
        inverse = geometry.invert_theta(theta)
        warped = geometry.warp(aligned[None], inverse, size=size, mode="bicubic")[0].clamp(0, 1)
        covered = geometry.valid_mask(inverse, *size)[0]  # (1, H, W)
        return covered * warped + (1.0 - covered) * original
