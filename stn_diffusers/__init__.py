"""stn-diffusers: align images in the latent space of a diffusers VAE with a spatial transformer."""

import importlib
from typing import TYPE_CHECKING

from . import geometry
from .default import load_default

__version__ = "0.1.0"

# The models and pipelines import diffusers (which brings torch's compiler and transformers: seconds
# on a small machine), the inpainting helpers Stable Diffusion's text encoders as well. They load on
# first use, so `import stn_diffusers` and the command line's help and input checks start with torch
# alone, and aligning pays for diffusers when it loads a pipeline.
_LAZY_EXPORTS = {
    "STN_PRESETS": ".models",
    "SpatialTransformer": ".models",
    "SpatialTransformerOutput": ".models",
    "STNAlignmentPipeline": ".pipelines",
    "STNAlignmentPipelineOutput": ".pipelines",
    "InpaintingInputs": ".inpainting",
    "STNInpaintPipeline": ".inpainting",
    "STNInpaintPipelineOutput": ".inpainting",
    "prepare_inpainting_inputs": ".inpainting",
    "RealignEditOutput": ".realign",
    "realign_edit": ".realign",
}
# Submodules that importing the package used to load along the way, reachable as attributes as before.
_LAZY_SUBMODULES = ("images", "models", "pipelines", "refine")

if TYPE_CHECKING:  # static analysis sees the lazy exports as ordinary imports
    from .inpainting import InpaintingInputs, STNInpaintPipeline, STNInpaintPipelineOutput, prepare_inpainting_inputs
    from .models import STN_PRESETS, SpatialTransformer, SpatialTransformerOutput
    from .pipelines import STNAlignmentPipeline, STNAlignmentPipelineOutput
    from .realign import RealignEditOutput, realign_edit


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY_SUBMODULES))


__all__ = [
    "InpaintingInputs",
    "STN_PRESETS",
    "STNAlignmentPipeline",
    "STNAlignmentPipelineOutput",
    "STNInpaintPipeline",
    "STNInpaintPipelineOutput",
    "SpatialTransformer",
    "SpatialTransformerOutput",
    "geometry",
    "load_default",
    "prepare_inpainting_inputs",
    "RealignEditOutput",
    "realign_edit",
]
