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

DEFAULT_PIPELINE_DIR = Path(__file__).resolve().parent / "weights" / "default"


def load_default(device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32):
    """The embedded ``STNAlignmentPipeline``, ready on ``device`` in ``torch_dtype``.

    >>> from stn_diffusers import load_default
    >>> pipe = load_default()
    >>> out = pipe(moving_image, reference=reference_image)
    """
    from .pipelines import STNAlignmentPipeline

    if not (DEFAULT_PIPELINE_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"expected the embedded default pipeline at {str(DEFAULT_PIPELINE_DIR)!r}, found none; "
            "reinstall stn-diffusers or re-create it with `python scripts/train_default.py`"
        )
    # Safetensors only: a pickled ``.bin`` dropped into the installed package is never unpickled.
    # float32 is what loading gives anyway; naming it would cost a warning on every load where diffusers
    # has renamed the keyword (`torch_dtype` to `dtype`), and older releases know only the old name.
    dtype = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    with _quiet_loading():
        pipe = STNAlignmentPipeline.from_pretrained(DEFAULT_PIPELINE_DIR, use_safetensors=True, **dtype)
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
