"""diffusers custom-pipeline entry point for `STNInpaintPipeline`.

    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained(
    ...     "path/to/pipeline", custom_pipeline="pipelines/stn_inpaint.py", trust_remote_code=True
    ... )

The class is defined once, in the installed `stn_diffusers` package; this file only points to it.
"""

from stn_diffusers.inpainting import STNInpaintPipeline

__all__ = ["STNInpaintPipeline"]
