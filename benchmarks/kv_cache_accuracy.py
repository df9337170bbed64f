"""SmolLM2 with a quantized KV cache vs the float cache, on CPU (the reference path).

    python benchmarks/kv_cache_accuracy.py            # int8 and int4, 20 prompts x 16 greedy tokens

Prints (1) the KL of next-token distributions when the second half of 8 x 128-token held-out
sequences attends to a cache filled by the first half (`lowbit.attention.evaluate.kv_cache_kl`),
and (2) greedy generation agreement with the float cache over 20 prompts from the built-in corpus
(`generation_agreement`: the fraction of the 320 generated positions with the same token).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lowbit.attention.evaluate import generation_agreement, kv_cache_kl  # noqa: E402
from lowbit.models import load_source  # noqa: E402
from lowbit.pipeline import eval_data  # noqa: E402


def main() -> None:
    kinds = sys.argv[1:] or ["int8", "int4"]
    torch.manual_seed(0)
    src = load_source("smollm2")
    ids, _ = eval_data(src, n_seqs=8, seq_len=128)
    t0 = time.perf_counter()
    kl = kv_cache_kl(src.model, ids, kinds=tuple(kinds))
    print(f"KV cache KL ({time.perf_counter() - t0:.0f}s): " + ", ".join(f"{k} {v:.3g}" for k, v in kl.items()))
    for kind in kinds:
        t0 = time.perf_counter()
        agr = generation_agreement(src.model, src.tokenizer, kind)
        print(f"{kind}: greedy agreement with the float cache {100 * agr['match']:.1f}% of {agr['positions']} positions "
              f"({agr['prompts']} prompts), identical prefix {100 * agr['prefix']:.1f}% ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
