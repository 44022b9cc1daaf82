"""medseg-pipeline: U-Net-family segmentation bundles for MONAI, with the code their configs call."""

__version__ = "0.1.0"
