from .correlation_localizer import CorrelationLocalizer
from .localizer import Localizer
from .seed_localizer import SeedLocalizer
from .spatial_transformer import STN_PRESETS, SpatialTransformer, SpatialTransformerOutput

__all__ = [
    "STN_PRESETS",
    "CorrelationLocalizer",
    "Localizer",
    "SeedLocalizer",
    "SpatialTransformer",
    "SpatialTransformerOutput",
]
