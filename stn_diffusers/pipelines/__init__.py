from .pipeline_output import STNAlignmentPipelineOutput
from .pipeline_stn_alignment import STNAlignmentPipeline

__all__ = ["STNAlignmentPipeline", "STNAlignmentPipelineOutput"]
