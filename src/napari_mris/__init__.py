"""napari-mris: medical referring image segmentation with an autoregressive token model."""

__version__ = "0.1.0"
