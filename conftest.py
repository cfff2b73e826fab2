"""Shared pytest configuration: float64 by default in our own tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Fix the global seed and restore the default dtype after every test."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
