import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def gen():
    """A seeded generator: tests use random, never all-zero, inputs."""
    return torch.Generator().manual_seed(1234)
