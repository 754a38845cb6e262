"""thawlab: compare how to adapt pretrained image backbones, in distribution and out of it."""
__version__ = "0.1.0"
