import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def gen():
    """A seeded generator: tests use random, never all-zero, inputs."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def reference_linear():
    """Pins quantized linears to the reference backend, for tests that compare an export (which
    reproduces the stored weights in fp32) with lowbit's own model on CPU, where blocked int4 / int8
    layers otherwise run PyTorch's CPU int4 kernel with bf16 activations (kernels/cpu.py)."""
    from lowbit.kernels.registry import force_backend

    with force_backend("linear", "reference"):
        yield
