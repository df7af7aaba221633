"""ASAG: one-decoder-layer sparse detectors with Adaptive Sparse Anchor Generation."""

__version__ = "0.1.0"
