"""Built-in recipes, shown by `lowbit recipes`. Each is an ordinary recipe dict (see recipe.py)."""

from __future__ import annotations

# Embeddings of the 4-bit recipes: int8 in blocks of 32 with fp16 scales, exactly Q8_0 / MLX
# affine 8-bit, so the packages export to GGUF and MLX without refusals
_EMB8 = {"format": "int8", "block_size": 32, "scale_dtype": "fp16"}

BUILTIN: dict[str, dict] = {
    # int8 per output channel loses ~3% top-1 agreement on SmolLM2 (its rows carry outliers);
    # blocks of 32 keep it near-lossless. int8-fast trades that for the CPU int8 matmul kernel.
    "int8": {
        "name": "int8",
        "description": "int8 in blocks of 32 with fp16 scales (8.5 bits/weight): near-lossless; the default",
        "global": {"format": "int8", "block_size": 32, "scale_dtype": "fp16"},
        "weight_threshold": 1024,
        "divisibility": "pad",
    },
    "int8-fast": {
        "name": "int8-fast",
        "description": "int8 per output channel: runs PyTorch's int8 matmul on CPU (bf16 activations)",
        "global": "int8",
        "weight_threshold": 1024,
    },
    "int4": {
        "name": "int4",
        "description": "int4 blocks of 32, fp16 scales; embeddings int8",
        "global": "int4",
        "types": {"Embedding": _EMB8},
        "weight_threshold": 1024,
        "divisibility": "pad",
    },
    "w4-mx": {
        "name": "w4-mx",
        "description": "int4 with an E8M0 power-of-two scale per 32 (int4-e8m0); embeddings int8",
        "global": "int4-e8m0",
        "types": {"Embedding": _EMB8},
        "weight_threshold": 1024,
        "divisibility": "pad",
    },
    "mxfp4": {
        "name": "mxfp4",
        "description": "OCP MXFP4 (E2M1 + E8M0 per 32); embeddings int8",
        "global": "mxfp4",
        "types": {"Embedding": _EMB8},
        "weight_threshold": 1024,
        "divisibility": "pad",
    },
    "lut4": {
        "name": "lut4",
        "description": "4-bit k-means palettes, one LUT per 16 output channels; embeddings int8",
        "global": {"format": "lut4", "group_size": 16},
        "types": {"Embedding": _EMB8},
        "weight_threshold": 1024,
    },
    "gguf-q4_0": {
        "name": "gguf-q4_0",
        "description": "llama.cpp Q4_0 blocks with Q8_0 embeddings: exports to GGUF byte for byte",
        "global": "q4_0",
        "types": {"Embedding": "q8_0"},
        "weight_threshold": 1024,
    },
    "mixed": {
        "name": "mixed",
        "description": "int4 blocks of 32, but embeddings, lm_head and the first and last blocks at int8",
        "global": "int4",
        "types": {"Embedding": "int8"},
        "names": {"?lm_head": "int8"},
        "edge_blocks": 1,
        "edge_format": "int8",
        "weight_threshold": 1024,
        "divisibility": "pad",
    },
}
