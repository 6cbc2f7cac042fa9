from .spatial_transformer import STN_PRESETS, SpatialTransformer, SpatialTransformerOutput

__all__ = ["STN_PRESETS", "SpatialTransformer", "SpatialTransformerOutput"]
