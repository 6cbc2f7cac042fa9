"""stn-diffusers: align images in the latent space of a diffusers VAE with a spatial transformer."""

from . import geometry
from .default import load_default
from .inpainting import InpaintingInputs, STNInpaintPipeline, STNInpaintPipelineOutput, prepare_inpainting_inputs
from .models import STN_PRESETS, SpatialTransformer, SpatialTransformerOutput
from .pipelines import STNAlignmentPipeline, STNAlignmentPipelineOutput

__version__ = "0.1.0"

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
