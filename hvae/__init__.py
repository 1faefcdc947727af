"""hvae: NVAE-style hierarchical VAEs in PyTorch."""
__version__ = "0.1.0"
