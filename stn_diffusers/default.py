"""The embedded default pipeline: a small VAE and a registration STN shipped inside the package.

It is trained by ``scripts/train_default.py`` on photos from packages (see the README), stored as
fp16 safetensors in ``stn_diffusers/weights/default/``, and loaded with no network. Its STN is
tied to its own small VAE's latent space: to align in Stable Diffusion's latent space, fine-tune an
STN for that VAE (``python -m stn_diffusers.finetune --pretrained_vae_name_or_path stabilityai/sd-vae-ft-mse``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_PIPELINE_DIR = WEIGHTS_DIR / "default"
# The embedded pipelines by name. "fast" (the default) encodes a 512×512 photo in about 26 ms on one
# CPU thread with an AutoencoderTiny; "accurate" keeps the slower AutoencoderKL (about 0.9 s), whose
# latents warp more like the pixels, so its STN alone is more accurate (benchmarks/RESULTS.md).
EMBEDDED_PIPELINES = {"fast": DEFAULT_PIPELINE_DIR, "accurate": WEIGHTS_DIR / "accurate"}


def load_default(
    device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32, variant: str = "fast"
):
    """The embedded ``STNAlignmentPipeline``, ready on ``device`` in ``torch_dtype``.

    ``variant``: ``"fast"`` (the default) or ``"accurate"`` (see :data:`EMBEDDED_PIPELINES`).

    >>> from stn_diffusers import load_default
    >>> pipe = load_default()
    >>> out = pipe(moving_image, reference=reference_image)
    """
    from .pipelines import STNAlignmentPipeline

    if variant not in EMBEDDED_PIPELINES:
        raise ValueError(f"expected variant in {tuple(EMBEDDED_PIPELINES)}, got {variant!r}")
    folder = EMBEDDED_PIPELINES[variant]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"expected the embedded {variant!r} pipeline at {str(folder)!r}, found none; "
            "reinstall stn-diffusers or re-create it with `python scripts/train_default.py`"
        )
    # Safetensors only: a pickled ``.bin`` dropped into the installed package is never unpickled.
    # float32 is what loading gives anyway; naming it would cost a warning on every load where diffusers
    # has renamed the keyword (`torch_dtype` to `dtype`), and older releases know only the old name.
    dtype = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    with _quiet_loading():
        pipe = STNAlignmentPipeline.from_pretrained(folder, use_safetensors=True, **dtype)
    return pipe.to(device)


@contextlib.contextmanager
def _quiet_loading():
    """No "Loading pipeline components" bar for the two small local files: it would be the only
    thing a plain ``stn-diffusers align`` prints to stderr. The caller's setting is restored."""
    from diffusers.utils import logging as diffusers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()
