"""Neural building blocks and small reference CNNs (``nn.Module`` code only)."""

from models.blocks import DepthwiseSeparable, InvertedResidual, SpatialSeparable
from models.zoo import ZOO, build_zoo_model

__all__ = [
    "ZOO",
    "DepthwiseSeparable",
    "InvertedResidual",
    "SpatialSeparable",
    "build_zoo_model",
]
