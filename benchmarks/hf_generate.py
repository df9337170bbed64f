"""Hugging Face `model.generate` tokens/s with lowbit's attention and quantized KV caches, eager.

    python benchmarks/hf_generate.py                      # SmolLM2-135M-shaped model, bf16 on the GPU
    python benchmarks/hf_generate.py --new-tokens 64 --profile    # + where the host time goes

The model is a `LlamaForCausalLM` built from a SmolLM2-135M-shaped config with random weights
(hidden 576, 30 layers, 9 query / 3 key-value heads, head dim 64; no download). Greedy generation of
`--new-tokens` tokens after a `--prompt`-token random prompt, batch 1, in eager mode as a user's
`model.generate` runs: SDPA with the float cache (the peer), lowbit's attention with the float cache,
and lowbit's attention with the int8 / int4 caches (`lowbit.attention.enable`), each on its own copy
of the model. Medians of `--rounds` rounds after one warm-up run of each; a round runs every option
once, so that a change in the host's speed during the run hits all of them alike (on a shared host
sequential runs moved by up to 25 %). A small model in eager mode is bound by the host (Python
and kernel launches), so this measures the per-token overhead each option adds, not the kernels;
`benchmarks/attention.py` times the kernels. `--profile` prints cProfile's top functions of one
int8-cache run (the profiler's own cost inflates Python-heavy lines; read the shares).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import lowbit.attention as la  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also cProfile one int8-cache run")
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SMOLLM2_135M, attn_implementation="sdpa")
    ids = torch.randint(1, cfg.vocab_size, (1, args.prompt), device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def generate(model):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

    def tokens_per_s(model) -> float:
        sync()
        t0 = time.perf_counter()
        generate(model)
        sync()
        return args.new_tokens / (time.perf_counter() - t0)

    peer = transformers.LlamaForCausalLM(cfg).eval().to(dev, dtype)
    options = {"SDPA, float cache": peer}
    for kind in (None, "int8", "int4"):
        model = transformers.LlamaForCausalLM(cfg).eval().to(dev, dtype)
        model.load_state_dict(peer.state_dict())
        la.enable(model, attention="lowbit", kv_cache=kind)
        options[f"lowbit attention, {kind or 'float'} cache"] = model
    for model in options.values():  # warm-up: compiles the kernels
        generate(model)
    runs: dict[str, list[float]] = {name: [] for name in options}
    for _ in range(args.rounds):
        for name, model in options.items():
            runs[name].append(tokens_per_s(model))
    rows = [(name, statistics.median(r)) for name, r in runs.items()]
    model = options["lowbit attention, int8 cache"]
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; SmolLM2-135M-shaped, {dtype}, batch 1, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens, eager")
    print(f"{'':34s} {'tok/s':>7s} {'x SDPA':>7s}")
    for name, tps in rows:
        print(f"{name:34s} {tps:7.1f} {tps / rows[0][1]:6.2f}x")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        generate(model)
        sync()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(15)
        print(out.getvalue())


if __name__ == "__main__":
    main()
