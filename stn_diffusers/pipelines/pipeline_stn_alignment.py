"""`STNAlignmentPipeline`: align images in the latent space of a diffusers VAE."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging

from .. import geometry
from ..images import ImageInput, tensor_to_pil, to_rgb_list
from ..models.spatial_transformer import SpatialTransformer
from ..refine import REFINE_METHODS, import_cv2, refine_theta_ecc
from .pipeline_output import STNAlignmentPipelineOutput

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")



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


def _vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


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
    own size. All inputs of one call share one working size.

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
        self.vae_scale_factor = _vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False)
        latent_channels = vae.config.latent_channels
        if stn.config.in_channels != latent_channels:
            raise ValueError(
                f"expected an stn with in_channels={latent_channels} (the VAE's latent_channels), got {stn.config.in_channels}"
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
    def working_size(self, size: tuple[int, int], height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The ``(height, width)`` images of size ``size = (H, W)`` are encoded at (see class docs)."""
        factor = self.vae_scale_factor
        config = self.stn.config
        if height is not None or width is not None:
            if height is None or width is None or height % factor or width % factor or min(height, width) <= 0:
                raise ValueError(
                    f"expected both height and width as positive multiples of {factor} (the VAE factor), got {height}×{width}"
                )
            return height, width
        longest = config.sample_size * factor
        if self.stn.fixed_sample_size is not None:
            return longest, longest
        minimum = self.stn.min_sample_size * factor
        scale = longest / max(size)
        return tuple(max(minimum, int(side * scale) // factor * factor) for side in size)

    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = False
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` → scaled latents ``(B, C, H/f, W/f)`` as diffusion models see them."""
        images = images.to(device=self._execution_device, dtype=self.vae.dtype)
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
    ) -> torch.Tensor:
        """RGB images ``(3, H, W)`` in ``[0, 1]`` (a list, or a ``(B, 3, H, W)`` batch) → scaled latents
        ``(B, C, height/f, width/f)``, each resized (antialiased) to the working size first.

        The one encode path of the project (the pipeline, fine-tuning, evaluation and analysis):
        ``batch_size`` images go through the VAE at once (default: all).
        """
        batch_size = batch_size or len(images)
        chunks = []
        for start in range(0, len(images), batch_size):
            chunk = torch.stack([_resize(image.unsqueeze(0), height, width)[0] for image in images[start : start + batch_size]])
            chunk = self.image_processor.preprocess(chunk, height=height, width=width)  # (b, 3, height, width) in [-1, 1]
            chunks.append(self.encode(chunk, generator, sample_posterior))
        return torch.cat(chunks)

    def predict_theta(
        self, latents: torch.Tensor, reference_latents: torch.Tensor | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        """θ ``(B, 2, 3)`` float32 that aligns ``latents`` ``(B, C, h, w)`` onto ``reference_latents``.

        The one θ path of the project: ``batch_size`` pairs at a time (default: all), each chunk moved
        to the STN's device and dtype. A reference is passed on only to an STN that looks at one, so
        callers never branch on ``conditioning``. Runs under the caller's grad mode.
        """
        batch_size = batch_size or latents.shape[0]
        uses_reference = self.stn.config.conditioning == "reference"
        if uses_reference and reference_latents is None:
            raise ValueError("expected reference_latents: this stn registers onto a reference")
        device, dtype = self.stn.device, self.stn.dtype
        thetas = []
        for start in range(0, latents.shape[0], batch_size):
            moving = latents[start : start + batch_size].to(device=device, dtype=dtype)
            reference = reference_latents[start : start + batch_size].to(device=device, dtype=dtype) if uses_reference else None
            thetas.append(self.stn.predict_theta(moving, reference).float())
        return torch.cat(thetas)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, C, h, w)`` → images ``(B, 3, h·f, w·f)`` in ``[-1, 1]``."""
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        latents = latents.to(self.vae.dtype) / getattr(config, "scaling_factor", 1.0) + shift
        return self.vae.decode(latents).sample

    def check_inputs(self, image, reference, latents, reference_latents, output_type, min_displacement, batch_size, refine=None):
        if image is None and latents is None:
            raise ValueError("expected an image (or latents) to align, got neither")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"expected output_type in {OUTPUT_TYPES}, got {output_type!r}")
        if min_displacement < 0:
            raise ValueError(f"expected min_displacement >= 0 pixels, got {min_displacement}")
        if int(batch_size) < 1:
            raise ValueError(f"expected batch_size >= 1, got {batch_size}")
        needs_reference = self.stn.config.conditioning == "reference"
        if needs_reference and reference is None and reference_latents is None:
            raise ValueError("expected a reference (or reference_latents): this stn registers onto a reference")
        for name, tensor in (("latents", latents), ("reference_latents", reference_latents)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.ndim != 4):
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(f"expected {name} of shape (B, {self.stn.config.in_channels}, h, w), got {shape}")
        if refine is not None and refine not in REFINE_METHODS:
            raise ValueError(f"expected refine in {(None, *REFINE_METHODS)}, got {refine!r}")
        if refine is not None and (image is None or reference is None):
            raise ValueError(f"expected both image and reference with refine={refine!r}: it refines on their pixels")
        if refine == "ecc":
            import_cv2()  # fail before the encode, naming the extra to install

    def _postprocess_originals(self, images: list[torch.Tensor], output_type: str):
        if output_type == "pil":
            return [tensor_to_pil(image) for image in images]
        same_size = len({tuple(image.shape) for image in images}) == 1
        if output_type == "pt":
            return torch.stack(images) if same_size else images
        arrays = [image.permute(1, 2, 0).numpy() for image in images]
        return np.stack(arrays) if same_size else arrays

    # --------------------------------------------------------------------------------------- call
    @torch.no_grad()
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
    ) -> STNAlignmentPipelineOutput | tuple:
        r"""Align ``image`` onto ``reference``.

        Args:
            image: the moving image(s): PIL, numpy, torch or a list (see ``stn_diffusers.images``).
            reference: the reference image(s); one reference is shared by every image. Required when
                ``stn.config.conditioning == "reference"``.
            latents, reference_latents (`torch.Tensor` of shape `(B, C, h, w)`): already encoded and
                scaled latents; skip the encode (workflows that hold SD latents).
            height, width: the working size (see the class docs).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (no decode).
            return_dict: return a :class:`STNAlignmentPipelineOutput` rather than a tuple.
            generator: used only with ``sample_posterior=True``.
            sample_posterior: sample the VAE posterior instead of taking its mode.
            min_displacement: pixels; when the estimated mean corner motion of an input is below
                it, the input is returned unwarped (θ = identity) and flagged in ``unwarped``, so
                aligned images are never resampled for nothing.
            batch_size: images encoded, aligned and decoded at once; a progress bar shows above one batch.
            refine: ``None`` or ``"ecc"``: refine each θ with OpenCV's ECC on the original images,
                started from the STN's θ (needs ``pip install "stn-diffusers[opencv]"`` and the images,
                not only latents). Where ECC fails, the STN's θ is kept and ``refined`` is False.
            refine_kwargs: keyword arguments of :func:`stn_diffusers.refine.refine_theta_ecc`
                (``levels``, ``iterations``, ``epsilon``, ``max_side``, ``max_correction``).

        Returns:
            :class:`STNAlignmentPipelineOutput` or the tuple ``(images, warped_images, theta, latents)``.
        """
        # 1. Check inputs
        self.check_inputs(image, reference, latents, reference_latents, output_type, min_displacement, batch_size, refine)
        uses_reference = self.stn.config.conditioning == "reference"
        if reference is not None and not uses_reference:
            logger.warning("This stn has conditioning='none': it ignores the reference.")

        # 2. Preprocess
        originals = to_rgb_list(image, "image") if image is not None else None
        references = to_rgb_list(reference, "reference") if reference is not None and uses_reference else None
        num_images = len(originals) if originals is not None else latents.shape[0]
        if references is not None and len(references) not in (1, num_images):
            raise ValueError(f"expected 1 or {num_images} references (one per image), got {len(references)}")
        if latents is not None and latents.shape[0] != num_images:
            raise ValueError(f"expected latents with batch size {num_images} (the number of images), got {latents.shape[0]}")
        size_source = references[0] if references is not None else originals[0] if originals is not None else None
        if size_source is not None:
            work_height, work_width = self.working_size(tuple(size_source.shape[-2:]), height, width)

        # 3. Encode
        def encode_all(images: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(
                [
                    self.encode_images(images[start : start + batch_size], work_height, work_width, generator, sample_posterior)
                    for start in range(0, len(images), batch_size)
                ]
            )

        if latents is None:
            latents = encode_all(originals)  # (B, C, h, w)
        if uses_reference and reference_latents is None:
            reference_latents = encode_all(references)
        if reference_latents is not None and reference_latents.shape[0] == 1 and num_images > 1:
            reference_latents = reference_latents.expand(num_images, -1, -1, -1)
        if reference_latents is not None and reference_latents.shape != latents.shape:
            raise ValueError(
                f"expected reference_latents of shape {tuple(latents.shape)} (the image latents'), got {tuple(reference_latents.shape)}"
            )

        # 4. Align
        stn_dtype = self.stn.dtype
        thetas = []
        chunks = range(0, num_images, batch_size)
        progress = self.progress_bar(total=len(chunks)) if len(chunks) > 1 else None
        for start in chunks:
            moving = latents[start : start + batch_size].to(device=self.stn.device, dtype=stn_dtype)
            ref = None
            if uses_reference:
                ref = reference_latents[start : start + batch_size].to(device=self.stn.device, dtype=stn_dtype)
            thetas.append(self.stn.predict_theta(moving, ref).float())
            if progress is not None:
                progress.update()
        if progress is not None:
            progress.close()
        theta = torch.cat(thetas)  # (B, 2, 3)
        refined = None
        if refine == "ecc":
            targets = references if references is not None else to_rgb_list(reference, "reference")
            targets = targets * num_images if len(targets) == 1 else targets
            result = refine_theta_ecc(targets, originals, theta.cpu(), **(refine_kwargs or {}))
            theta, refined = result.theta.to(theta.device), result.converged
            if not refined.all():
                logger.warning("ECC refinement failed on %d of %d image(s); kept the STN's θ there.", int((~refined).sum()), num_images)
        pixel_sizes = [tuple(o.shape[-2:]) for o in originals] if originals is not None else [
            (latents.shape[-2] * self.vae_scale_factor, latents.shape[-1] * self.vae_scale_factor)
        ] * num_images
        identity = geometry.identity_theta(num_images, theta.device)
        displacement = torch.stack(
            [geometry.corner_error(theta[i : i + 1], identity[i : i + 1], *pixel_sizes[i])[0] for i in range(num_images)]
        )
        unwarped = displacement < min_displacement
        theta = torch.where(unwarped.view(-1, 1, 1), identity, theta)
        aligned_latents = geometry.warp(latents.float(), theta.to(latents.device), padding_mode=self.stn.config.padding_mode)
        aligned_latents = aligned_latents.to(latents.dtype)

        # 5. Decode
        images = None
        if output_type != "latent":
            decoded = torch.cat([self.decode(aligned_latents[s : s + batch_size]) for s in chunks])
            # 6. Postprocess
            images = self.image_processor.postprocess(decoded.float(), output_type=output_type)

        warped_images = None
        if originals is not None and output_type != "latent":
            warped = [
                geometry.warp(original.unsqueeze(0), theta[i : i + 1].cpu(), mode="bicubic")[0].clamp(0, 1)
                if not unwarped[i]
                else original
                for i, original in enumerate(originals)
            ]
            warped_images = self._postprocess_originals(warped, output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, warped_images, theta, aligned_latents)
        return STNAlignmentPipelineOutput(
            images=images,
            warped_images=warped_images,
            theta=theta,
            latents=aligned_latents,
            displacement=displacement,
            unwarped=unwarped,
            refined=refined,
        )

