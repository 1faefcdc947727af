"""Shared pytest set-up: the ``gpu`` marker, and cuBLAS made deterministic where asked.

``pytest -m gpu`` runs the tests that need a CUDA GPU (tests/test_gpu.py; they use
synthetic data only, so a bare GPU machine runs them); elsewhere they are skipped.
"""
import os

# cuBLAS is deterministic under torch.use_deterministic_algorithms only with a fixed
# workspace, which must be set before the first CUDA call (the exact-resume tests)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
