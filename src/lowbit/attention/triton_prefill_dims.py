"""Head dims the fused prefill kernel compiles for (kept apart so checking needs no Triton)."""

HEAD_DIMS = (64, 80, 96, 128, 256)
