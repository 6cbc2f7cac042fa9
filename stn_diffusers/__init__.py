"""stn-diffusers: align images in the latent space of a diffusers VAE with a spatial transformer."""

import importlib

from . import geometry
from .default import load_default
from .models import STN_PRESETS, SpatialTransformer, SpatialTransformerOutput
from .pipelines import STNAlignmentPipeline, STNAlignmentPipelineOutput

__version__ = "0.1.0"

# The inpainting helpers pull in Stable Diffusion's text encoders through diffusers; they load on
# first use so that aligning, the CLI and the tests of everything else start quickly.
_LAZY_EXPORTS = {
    "InpaintingInputs": ".inpainting",
    "STNInpaintPipeline": ".inpainting",
    "STNInpaintPipelineOutput": ".inpainting",
    "prepare_inpainting_inputs": ".inpainting",
}


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
]
