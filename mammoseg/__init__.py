"""mammoseg: an MLOps pipeline for full-resolution mammography segmentation."""

__version__ = "0.1.0"
