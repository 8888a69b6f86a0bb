from zoo.backbones.pyramid import SimpleFeaturePyramid
from zoo.backbones.timm_backbone import TimmBackbone

__all__ = ["TimmBackbone", "SimpleFeaturePyramid"]
