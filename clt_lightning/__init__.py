"""clt-lightning: Cross-Layer Transcoders for frozen CLIP vision transformers."""

__version__ = "0.1.0"
