"""NVAE model: ``NVAE(config)`` and its forward output ``NVAEOutput``."""
from hvae.model.nvae import NVAE, Likelihood, NVAEOutput

__all__ = ["NVAE", "NVAEOutput", "Likelihood"]
