"""Decode tokens/s of a Llama-3-8B-shaped model (batch 1 by default): bf16 vs lowbit formats, CUDA
graphs for all.

    python benchmarks/decode.py                       # bf16, int4, int4-e8m0, mxfp4, int8
    python benchmarks/decode.py --formats int4-e8m0 --layers 4 --steps 50   # quick look
    python benchmarks/decode.py --formats int4-e8m0 --batch 16   # 16 sequences a step: the linears at M = 16

The model is built from the Llama-3-8B config with random weights (N(0, 0.02), no download):
hidden 4096, 32 layers, 32 query / 8 key-value heads, MLP 14336, vocabulary 128256, untied
lm_head, RoPE theta 500000. It is a minimal decoder written here with the modules and shapes of
transformers' `LlamaForCausalLM` (`layers.N.self_attn.q_proj`, ..., `mlp.down_proj`, `lm_head`) and
a static KV cache, so that one whole decode step captures in a CUDA graph.
Every `nn.Linear`, lm_head included, becomes a lowbit `QuantLinear` for the quantized runs (the
embedding stays bf16: a lookup reads one row); palettes (`--formats lut4`) get random tables and
codes, as in matmul.py. One decode step (all layers, the argmax, the KV
cache write, the position update) is captured in a CUDA graph and replayed; tokens/s = steps /
time, after a 128-token random prefix in the cache. Correctness: the first step's logits of every
lowbit model against the same model run with the reference backend (dequantize, then F.linear).
The element-wise work between the linears (residual add + RMSNorm, RoPE with both cache writes,
SiLU * up, the next token's argmax) is fused by `torch.compile` for every model (`Glue`;
`--eager-glue` leaves it as plain ops); the attention mask is made once per step as an additive
tensor (SDPA would otherwise turn a boolean mask into one in every layer). The linears and SDPA run
as they are, inside the same CUDA graph. (That glue, the same for every model, was trimmed on
2026-11-26: bf16 177 -> 188 tok/s, int4-e8m0 fused 380 -> 446 on an H200; RESULTS.md, session 31.)
`--compile-check` also runs one QuantLinear under `torch.compile(fullgraph=True)`.
`--fuse`: the lowbit models run with q / k / v and gate / up fused into one matmul each
(`lowbit.nn.fuse_projections`: the same codes, fewer launches); `--gated` adds a run of each format
fused with gated MLPs (gate / up joined row by row, silu(gate) * up in the matmul's epilogue,
`lowbit.nn.gated`: the SiLU * up kernel goes away); the bf16 model is also timed fused
(row "bf16 fused", column "x fused": the same transform on the float side, for a fair reading), and
the issue's ratio stays against the bf16 model as written. `--fuse-ab`: each format both ways.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

LLAMA3_8B = dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256, theta=500000.0, eps=1e-5)


def _rms(x, w, eps: float):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _add_rms(x, h, w, eps: float):
    """The residual add and the next RMSNorm: (x + h, rms_norm(x + h) * w)."""
    x = x + h
    return x, _rms(x, w, eps)


def _rope_write(q, k, v, cos, sin, pos, k_cache, v_cache):
    """RoPE on q and k, and k / v written to the caches at `pos`; returns the rotated q. Compiled
    with combo kernels this is one launch (it was three: 4.4 -> 1.4 us a layer on an H200)."""
    k_cache.index_copy_(2, pos, rope(k, cos, sin))
    v_cache.index_copy_(2, pos, v)
    return rope(q, cos, sin)


def _silu_mul(g, u):
    return F.silu(g) * u


def _next_token(logits):
    """Greedy next token (B, 1) from logits (B, 1, V). With V a multiple of 256 the argmax runs in two
    passes (maxima of 256 slices, then the best slice): one pass over 128256 values took 29 us of a
    2.3 ms step, two take ~2 us."""
    last = logits[:, -1]
    b, v = last.shape
    if v % 256:
        return last.argmax(-1, keepdim=True)
    vals, idx = last.view(b, 256, v // 256).max(-1)
    best = vals.argmax(-1, keepdim=True)
    return idx.gather(-1, best) + best * (v // 256)


class Glue:
    """The element-wise work between the linears (norms, residual adds, RoPE, SiLU * up): plain
    PyTorch ops, or each function fused into one kernel by `torch.compile` (`use(compiled=True)`),
    for the bf16 and the lowbit models alike. Eager, they are about 30 small kernels per layer (by
    count of the ops); fusing them took the bf16 model from 7.21 to 5.66 ms per token on an H200
    (benchmarks/RESULTS.md, 2026-11-25), time that would otherwise hide what the linears save."""

    FUNCTIONS = (_add_rms, _rope_write, _silu_mul, _next_token)
    add_rms, rope_write, silu_mul, next_token = (staticmethod(f) for f in FUNCTIONS)

    @classmethod
    def use(cls, compiled: bool) -> None:
        # combo kernels: independent outputs of one function (q, k's cache, v's cache) in one launch
        wrap = ((lambda f: torch.compile(f, fullgraph=True, dynamic=False, options={"combo_kernels": True}))
                if compiled else (lambda f: f))
        cls.add_rms, cls.rope_write, cls.silu_mul, cls.next_token = (staticmethod(wrap(f)) for f in cls.FUNCTIONS)


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return _rms(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h, nh, kvh = c["hidden"], c["heads"], c["kv_heads"]
        self.nh, self.kvh, self.hd = nh, kvh, h // nh
        self.q_proj = nn.Linear(h, nh * self.hd, bias=False)
        self.k_proj = nn.Linear(h, kvh * self.hd, bias=False)
        self.v_proj = nn.Linear(h, kvh * self.hd, bias=False)
        self.o_proj = nn.Linear(nh * self.hd, h, bias=False)

    def forward(self, x, cos, sin, pos, k_cache, v_cache, mask):
        b = x.shape[0]
        q = self.q_proj(x).view(b, 1, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, 1, self.kvh, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, 1, self.kvh, self.hd).transpose(1, 2)
        q = Glue.rope_write(q, k, v, cos, sin, pos, k_cache, v_cache)
        o = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, 1, self.nh * self.hd))


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.gate_proj = nn.Linear(c["hidden"], c["inter"], bias=False)
        self.up_proj = nn.Linear(c["hidden"], c["inter"], bias=False)
        self.down_proj = nn.Linear(c["inter"], c["hidden"], bias=False)
        self.act_fn = nn.SiLU()  # what `Glue.silu_mul` applies; named as in transformers (lowbit.nn.gated looks for it)

    def forward(self, x):
        return self.down_proj(Glue.silu_mul(self.gate_proj(x), self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden"], c["eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden"], c["eps"])
        self.mlp = MLP(c)


class Decoder(nn.Module):
    """Llama-shaped decoder for one-token steps against a static KV cache (CUDA-graph friendly)."""

    def __init__(self, c: dict, max_len: int):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab"], c["hidden"])
        self.layers = nn.ModuleList(Layer(c) for _ in range(c["layers"]))
        self.norm = RMSNorm(c["hidden"], c["eps"])
        self.lm_head = nn.Linear(c["hidden"], c["vocab"], bias=False)
        hd = c["hidden"] // c["heads"]
        inv = 1.0 / (c["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        ang = torch.cat((ang, ang), -1)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        self.register_buffer("slots", torch.arange(max_len), persistent=False)
        self.max_len = max_len

    def new_cache(self, batch: int, dtype, device):
        shape = (len(self.layers), batch, self.c["kv_heads"], self.max_len, self.c["hidden"] // self.c["heads"])
        return torch.randn(shape, dtype=dtype, device=device) * 0.5, torch.randn(shape, dtype=dtype, device=device) * 0.5

    def step(self, tok, pos, kc, vc):
        """Logits for token `tok` (B, 1) at position `pos` (1,), writing the KV cache at pos."""
        x = self.embed_tokens(tok)
        cos = self.cos[pos].to(x.dtype)[None, None]
        sin = self.sin[pos].to(x.dtype)[None, None]
        # additive, made once a step (a boolean mask costs SDPA two kernels a layer to convert)
        mask = torch.zeros((), dtype=x.dtype, device=x.device).masked_fill(self.slots > pos, float("-inf"))
        mask = mask[None, None, None, :]
        h = self.layers[0].input_layernorm(x)
        eps = self.c["eps"]
        for i, layer in enumerate(self.layers):
            x, h = Glue.add_rms(x, layer.self_attn(h, cos, sin, pos, kc[i], vc[i], mask),
                                layer.post_attention_layernorm.weight, eps)
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, h = Glue.add_rms(x, layer.mlp(h), nxt.weight, eps)
        return self.lm_head(h)


def build(c: dict, max_len: int, device) -> Decoder:
    with torch.device(device):
        model = Decoder(c, max_len).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return model.eval()


def swap_linears(model: nn.Module, fmt: str | None, originals: dict) -> None:
    """Every nn.Linear -> QuantLinear(fmt) (fmt None: put the originals back). Palettes (`lut4`) get
    a random table and random codes as in matmul.py (k-means over 8B weights is slow and does not
    change the speed)."""
    import lowbit
    from lowbit.nn import QuantLinear

    def quantized(w: torch.Tensor):
        if lowbit.PRESETS[fmt].family == "lut":
            from matmul import gpu_weight  # benchmarks/ is on sys.path when this script runs

            return gpu_weight(fmt, w)
        return lowbit.quantize_tensor(w.float(), fmt)

    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(child, nn.Linear) or full in originals:
                orig = originals.setdefault(full, child)
                if fmt is None:
                    setattr(mod, cname, orig)
                else:
                    q = QuantLinear(quantized(orig.weight.detach()))
                    q._lowbit_name = full
                    setattr(mod, cname, q)


def first_logits(model: Decoder, start: int = 128, seed: int = 1, batch: int = 1):
    """Logits of one step from a seeded random cache and tokens (`batch` sequences), plus the state
    for more steps."""
    dev = next(model.parameters()).device
    torch.manual_seed(seed)
    kc, vc = model.new_cache(batch, torch.bfloat16, dev)
    tok = torch.randint(0, model.c["vocab"], (batch, 1), device=dev)
    pos = torch.tensor([start], device=dev)
    with torch.no_grad():
        first = model.step(tok, pos, kc, vc).float()
    return first, (tok, pos, kc, vc)


def timed_decode(model: Decoder, steps: int, start: int = 128, profile: str = "",
                 batch: int = 1) -> tuple[float, torch.Tensor]:
    """(tokens/s over all `batch` sequences, logits of the first step) with one step captured in a
    CUDA graph; `profile` (a label): also print where the GPU time of a step goes, kernel by kernel
    (`kernel_table`)."""
    first, (tok, pos, kc, vc) = first_logits(model, start, batch=batch)
    with torch.no_grad():

        def one():
            logits = model.step(tok, pos, kc, vc)
            tok.copy_(Glue.next_token(logits))
            pos.add_(1)
            return logits

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                one()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one()
        pos.fill_(start)
        graph.replay()
        torch.cuda.synchronize()
        rates = []
        for _ in range(3):
            pos.fill_(start)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                graph.replay()
            torch.cuda.synchronize()
            rates.append(batch * steps / (time.perf_counter() - t0))
        if profile:
            kernel_table(profile, graph.replay, 1e6 * batch / statistics.median(rates))  # us per step
        del graph
    return statistics.median(rates), first


def kernel_table(label: str, replay, step_us: float, steps: int = 20, top: int = 12) -> None:
    """Print the GPU kernels of one replayed step by total time (torch.profiler over `steps`
    replays): calls per step, us per step, share of the step's wall time, and what is left between
    the kernels (launch gaps, idle) as the last row."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / steps, ev.count / steps, ev.key))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"-- {label}: one step {step_us:.0f} us wall, kernels {busy:.0f} us, {sum(r[1] for r in rows):.0f} launches")
    for us, n, name in rows[:top]:
        print(f"   {us:8.1f} us {100 * us / step_us:5.1f}%  x{n:<5.0f} {name[:90]}")
    rest = sum(r[0] for r in rows[top:])
    print(f"   {rest:8.1f} us {100 * rest / step_us:5.1f}%  other kernels; gaps / idle {step_us - busy:.0f} us "
          f"({100 * (step_us - busy) / step_us:.1f}%)")


def compile_check() -> None:
    """One QuantLinear under torch.compile(fullgraph=True) vs eager; eager placement must say triton."""
    import lowbit
    from lowbit.kernels import PLACEMENT
    from lowbit.nn import QuantLinear

    q = QuantLinear(lowbit.quantize_tensor(torch.randn(4096, 4096, device="cuda") * 0.02, "int4-e8m0"))
    q._lowbit_name = "probe"
    f = torch.compile(q, fullgraph=True)
    for m in (1, 16):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        PLACEMENT.clear()
        eager = q(x)
        placed = dict(PLACEMENT["probe"])
        comp = f(x)
        rel = ((comp.float() - eager.float()).norm() / eager.float().norm()).item()
        print(f"torch.compile(fullgraph=True) M={m}: rel diff vs eager {rel:.2e}; eager placement {placed}")
        assert rel < 1e-3 and placed == {"triton": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["int4", "int4-e8m0", "mxfp4", "int8"])
    ap.add_argument("--layers", type=int, default=LLAMA3_8B["layers"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1,
                    help="sequences decoded together (tokens/s counts all of them; the linears then run at M = batch)")
    ap.add_argument("--compile-check", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also print each model's GPU time per kernel (torch.profiler)")
    ap.add_argument("--fuse", action="store_true",
                    help="fuse q/k/v and gate/up into one matmul each (lowbit models; bf16 also timed fused)")
    ap.add_argument("--fuse-ab", action="store_true", help="time each lowbit format unfused and fused")
    ap.add_argument("--gated", action="store_true",
                    help="also time each lowbit format fused with gated MLPs (gate / up with silu(gate) * up in the "
                         "matmul's epilogue: fuse_projections(..., gated_mlp=True))")
    ap.add_argument("--eager-glue", action="store_true",
                    help="leave the element-wise work between the linears unfused (no torch.compile; the figures "
                         "before 2026-11-25)")
    args = ap.parse_args()
    import os

    from lowbit.kernels import PLACEMENT
    from lowbit.kernels.registry import force_backend

    c = dict(LLAMA3_8B, layers=args.layers)
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; commit {os.environ.get('LOWBIT_COMMIT', '?')}; "
          f"Llama-3-8B-shaped decoder, {c['layers']} layers, batch {args.batch}, bf16 activations, CUDA graph per step, "
          f"{'eager' if args.eager_glue else 'torch.compile-fused'} element-wise glue")
    Glue.use(compiled=not args.eager_glue)
    if args.compile_check:
        compile_check()
    model = build(c, max_len=512, device="cuda")
    n_lin = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight") or n == "lm_head.weight")
    label = (lambda name: name) if args.profile else (lambda name: "")  # --profile: label each model's table
    from lowbit.nn import fuse_projections, unfuse_projections

    rate_bf16, first_bf16 = timed_decode(model, args.steps, profile=label("bf16"), batch=args.batch)
    rate_fused = None
    if args.fuse or args.fuse_ab or args.gated:
        fuse_projections(model)
        rate_fused, _ = timed_decode(model, args.steps, profile=label("bf16 fused"), batch=args.batch)
        unfuse_projections(model)
    print(f"{'model':<16} {'weights GB':>10} {'tok/s':>8} {'x bf16':>7} {'x fused':>7} {'ms/tok':>7}  {'logits rel err':>14}  "
          "placement")
    print(f"{'bf16':<16} {2 * n_lin / 1e9:>10.2f} {rate_bf16:>8.1f} {1.0:>6.2f}x {'':>7} {1e3 / rate_bf16:>7.2f}")
    if rate_fused:
        print(f"{'bf16 fused':<16} {2 * n_lin / 1e9:>10.2f} {rate_fused:>8.1f} {rate_fused / rate_bf16:>6.2f}x {1.0:>6.2f}x "
              f"{1e3 / rate_fused:>7.2f}")
    originals: dict = {}
    results = {"bf16": rate_bf16}
    modes = ((False, True) if args.fuse_ab else (args.fuse,)) + (("gated",) if args.gated else ())
    runs = [(f, fuse) for f in args.formats for fuse in modes]
    for fmt, fuse in runs:
        swap_linears(model, fmt, originals)
        if fuse:
            fuse_projections(model, gated_mlp=fuse == "gated")
        qbytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".weight_" in n or n.startswith("lm_head"))
        PLACEMENT.clear()
        name = f"{fmt} {'fused+gated' if fuse == 'gated' else 'fused'}" if fuse else fmt
        rate, first = timed_decode(model, args.steps, profile=label(name), batch=args.batch)
        placed: dict = {}
        for counts in PLACEMENT.values():
            for k, v in counts.items():
                placed[k] = placed.get(k, 0) + v
        with force_backend("linear", "reference"):
            ref, state = first_logits(model, batch=args.batch)  # the reference twin of the first step, same inputs
        err = ((first - ref).norm() / ref.norm()).item()
        del ref, state, first
        results[name] = rate
        vs_fused = f"{rate / rate_fused:>6.2f}x" if rate_fused else f"{'':>7}"
        print(f"{name:<16} {qbytes / 1e9:>10.2f} {rate:>8.1f} {rate / rate_bf16:>6.2f}x {vs_fused} {1e3 / rate:>7.2f}  "
              f"{err:>14.2e}  {placed}", flush=True)
        unfuse_projections(model)
        swap_linears(model, None, originals)
        torch.cuda.empty_cache()
    print("tokens/s ratios vs bf16: " + ", ".join(f"{k} {v / rate_bf16:.2f}x" for k, v in results.items() if k != "bf16"))


if __name__ == "__main__":
    main()
