"""MLX export: planes move across without re-rounding; mx.dequantize == QTensor.dequantize exactly."""

import json

import numpy as np
import pytest
import torch

try:
    import mlx.core as mx
except Exception as e:  # pragma: no cover - depends on the platform
    print(f"test_export_mlx skipped: mlx is not importable ({e!r})")
    pytest.skip(f"mlx is not importable ({e!r})", allow_module_level=True)

import lowbit
from tiny_models import tiny_bpe_tokenizer, tiny_llama
from lowbit.export.mlx import export_mlx, qtensor_to_mlx

# exports reproduce the stored weights in fp32: compared with the reference path, not the CPU bf16 kernels
pytestmark = pytest.mark.usefixtures("reference_linear")

transformers = pytest.importorskip("transformers")


def _inputs(gen) -> dict[str, torch.Tensor]:
    rand = torch.randn(16, 256, generator=gen)
    adv = torch.randn(16, 256, generator=gen)
    adv[0] = 0.0                                    # all-zero row
    adv[1] *= 1e-6                                  # tiny scales (fp16 subnormals)
    adv[2] = 3.0                                    # constant blocks (zero range)
    adv[3, ::7] = 900.0                             # outliers
    adv[4] = torch.arange(256, dtype=torch.float32) - 128  # exact grid values / ties
    adv[5] = -adv[5].abs()                          # one-signed blocks
    adv[6, :128] = 1e-30                            # E8M0 scale clamps at 2^-127
    return {"random": rand, "adversarial": adv}


EXACT = [
    ("int4-asym", {}), ("int2", {}), ("int4", {}),
    ("int8", {"block_size": 32, "scale_dtype": "fp16"}),
    ("int8", {"block_size": 128, "scale_dtype": "fp16"}),
    ("int4-asym", {"block_size": 64}), ("int4", {"scale_dtype": "bf16"}),
    ("q4_0", {}), ("q4_1", {}), ("q8_0", {}),
    ("mxfp4", {}), ("gguf-mxfp4", {}), ("mxfp8-e4m3", {}),
]


@pytest.mark.parametrize("preset,kw", EXACT, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_dequantize_matches_exactly(gen, preset, kw):
    for kind, w in _inputs(gen).items():
        qt = lowbit.quantize_tensor(w, preset, **kw)
        a = qtensor_to_mlx(qt, name="w")
        assert a["weight"].dtype == np.uint32 and a["weight"].shape == (16, 256 * a["bits"] // 32)
        if a["mode"] == "affine":
            assert a["scales"].dtype == a["biases"].dtype and a["scales"].dtype in (np.float16, np.float32)
            # MLX does the arithmetic in the scales' dtype (fp16 scales: fp16 math, even with
            # dtype=float32). The stored values are exactly lowbit's, so with the arrays widened to
            # fp32 (exact) MLX's decode is lowbit's fp32 decode bit for bit.
            scales, biases = mx.array(a["scales"].astype(np.float32)), mx.array(a["biases"].astype(np.float32))
        else:
            assert a["scales"].dtype == np.uint8 and "biases" not in a
            assert np.array_equal(a["scales"], qt.scale.numpy())  # lowbit's exponents, not recomputed
            scales, biases = mx.array(a["scales"]), None
        ref = qt.dequantize().numpy()
        got = mx.dequantize(mx.array(a["weight"]), scales, biases, group_size=a["group_size"],
                            bits=a["bits"], mode=a["mode"], dtype=mx.float32)
        np.testing.assert_array_equal(np.array(got), ref, err_msg=f"{preset} {kw} {kind}")
        if a["mode"] == "affine":  # as stored (fp16 math for fp16 scales): within fp16 rounding
            native = mx.dequantize(mx.array(a["weight"]), mx.array(a["scales"]), mx.array(a["biases"]),
                                   group_size=a["group_size"], bits=a["bits"], dtype=mx.float32)
            np.testing.assert_allclose(np.array(native), ref, rtol=2e-3, atol=1e-6 + 2e-3 * np.abs(ref).max())


def test_packing_matches_mx_quantize(gen):
    # MLX's own quantizer: its codes, repacked by lowbit's packer, give its uint32 words
    from lowbit.formats.packing import pack

    w = torch.randn(4, 128, generator=gen)
    for bits in (2, 3, 4, 6, 8):
        wq, s, b = mx.quantize(mx.array(w.numpy()), group_size=32, bits=bits)
        s, b = np.array(s)[..., None], np.array(b)[..., None]
        codes = np.clip(np.round((w.numpy().reshape(4, 4, 32) - b) / s), 0, 2**bits - 1).astype(np.uint8)
        ours = pack(torch.from_numpy(codes.reshape(4, 128)), bits).numpy().view("<u4")
        assert np.array_equal(ours, np.array(wq)), bits


@pytest.mark.parametrize("preset,kw,why", [
    ("int4-e8m0", {}, "E8M0"), ("lut4", {}, "palettized"), ("int8", {}, "per-channel"),
    ("mxfp6-e3m2", {}, "mxfp4"), ("int4", {"block_size": 16}, "not 16"),
])
def test_refusals_name_alternatives(gen, preset, kw, why):
    qt = lowbit.quantize_tensor(torch.randn(8, 64, generator=gen), preset, **kw)
    with pytest.raises(ValueError, match=why) as e:
        qtensor_to_mlx(qt, name="model.layers.0.mlp.up_proj")
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj" in msg and preset in msg and "int4-asym" in msg and "mxfp4" in msg


def test_refuses_bias_overflow():
    w = torch.full((2, 32), 60000.0)
    w[:, 0] = -60000.0
    qt = lowbit.quantize_tensor(w, "int4")  # fp16 scale ~8571: -8 * scale overflows fp16
    with pytest.raises(ValueError, match="overflows"):
        qtensor_to_mlx(qt, name="w")


def test_refuses_padded_rows(gen):
    qt = lowbit.quantize_tensor(torch.randn(4, 40, generator=gen), "int4-asym", pad=True)
    assert qt.padded_cols == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        qtensor_to_mlx(qt, name="w")


# -- whole model ---------------------------------------------------------------------------------


def test_exporttiny_llama(tmp_path):
    from safetensors.numpy import load_file

    model = tiny_llama()
    lowbit.quantize(model, {"global": "int4-asym", "names": {
        "model.layers.0.self_attn.q_proj": "mxfp4", "model.layers.1.mlp.down_proj": None}})
    pkg = lowbit.save(model, tmp_path / "pkg", tokenizer=tiny_bpe_tokenizer())
    out = tmp_path / "mlx"
    info = export_mlx(pkg, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx", "pkg"]  # no temp folder left
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]
    assert q["group_size"] == 32 and q["bits"] == 4 and q["mode"] == "affine"
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    assert q["model.layers.1.mlp.down_proj"] is False
    assert cfg["quantization_config"] == q and cfg["model_type"] == "llama"
    t = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in t  # tied and identical: dropped
    assert t["model.layers.0.self_attn.k_proj.weight"].dtype == np.uint32
    assert t["model.layers.0.self_attn.k_proj.biases"].dtype == np.float16
    assert "model.layers.0.self_attn.q_proj.biases" not in t
    assert t["model.layers.0.self_attn.q_proj.scales"].dtype == np.uint8
    assert t["model.layers.1.mlp.down_proj.weight"].dtype == np.float32
    assert info["quantization"] == q

    with pytest.raises(FileExistsError, match="force=True"):
        export_mlx(pkg, out)
    export_mlx(model, out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "tokenizer.json").exists()

    # a refusal leaves nothing behind
    bad = tiny_llama()
    lowbit.quantize(bad, {"global": "int4-asym", "names": {"model.layers.1.mlp.up_proj": "lut4"}})
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        export_mlx(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_mlx_lm_forward_matches(tmp_path):
    """mlx-lm loads the folder; its logits match lowbit's model loosely (MLX runs its own kernels)."""
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.utils import load_model

    model = tiny_llama()
    lowbit.quantize(model, {"global": "int4-asym", "names": {"model.layers.0.self_attn.q_proj": "mxfp4",
                                                             "model.layers.0.mlp.up_proj": "int4",
                                                             "model.layers.1.mlp.down_proj": None}})
    pkg = lowbit.save(model, tmp_path / "pkg", tokenizer=tiny_bpe_tokenizer())
    export_mlx(pkg, tmp_path / "mlx")
    mlx_model, _ = load_model(tmp_path / "mlx")
    ids = [[1, 5, 9, 27, 3, 200, 17]]
    got = np.array(mlx_model(mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.float().numpy()
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)

    # the full mlx_lm.load (model + tokenizer) and a two-token greedy generation run
    m2, tok = mlx_lm.load(str(tmp_path / "mlx"))
    text = mlx_lm.generate(m2, tok, prompt="abc", max_tokens=2)
    assert isinstance(text, str)


def test_exact_scales_make_the_file_itself_decode_bit_exactly(tmp_path):
    """With exact_scales=True, mx.dequantize of the arrays *as written in the file* equals lowbit."""
    from safetensors.numpy import load_file

    model = tiny_llama()
    lowbit.quantize(model, {"global": "int4-asym", "names": {"model.layers.0.mlp.up_proj": "int4",
                                                            "model.layers.1.mlp.up_proj": "mxfp4"}})
    export_mlx(model, tmp_path / "mlx", exact_scales=True)
    t = load_file(str(tmp_path / "mlx" / "model.safetensors"))
    q = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    checked = 0
    for name, mod in model.named_modules():
        if not hasattr(mod, "qweight") or f"{name}.weight" not in t:
            continue
        params = q.get(name, {k: q[k] for k in ("group_size", "bits", "mode")})
        biases = t.get(f"{name}.biases")
        got = mx.dequantize(mx.array(t[f"{name}.weight"]), mx.array(t[f"{name}.scales"]),
                            None if biases is None else mx.array(biases), group_size=params["group_size"],
                            bits=params["bits"], mode=params["mode"], dtype=mx.float32)
        np.testing.assert_array_equal(np.array(got), mod.qweight.dequantize().numpy(), err_msg=name)
        checked += 1
    assert checked == 15  # 14 linear layers + the (tied) embedding


def test_cli_exact_scales_flag_writes_fp32_scales(tmp_path):
    """`lowbit export --to mlx --exact-scales` reaches the exporter: the scales in the file are fp32."""
    import lowbit
    from lowbit import package
    from lowbit.cli import main
    from safetensors import safe_open
    from tiny_models import tiny_llama

    m = tiny_llama()
    lowbit.quantize(m, {"global": "int4", "types": {"Embedding": "none"}}, progress=False)
    pkg = package.save(m, tmp_path / "pkg")
    assert main(["export", str(pkg), "--to", "mlx", "-o", str(tmp_path / "mlx"), "--exact-scales"]) == 0
    with safe_open(str(tmp_path / "mlx" / "model.safetensors"), "np") as f:
        scales = [f.get_tensor(k).dtype for k in f.keys() if k.endswith(".scales")]
    assert scales and all(str(d) == "float32" for d in scales)
