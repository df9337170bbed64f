"""Core ML export: constexpr ops decompress (coremltools' numpy reference) to lowbit's values exactly."""

import os

import numpy as np
import pytest
import torch
from torch import nn

try:
    import coremltools as ct  # noqa: F401
except Exception as e:  # pragma: no cover
    print(f"skipping Core ML export tests: coremltools unavailable ({e})")
    pytest.skip(f"coremltools unavailable ({e})", allow_module_level=True)

import lowbit
from lowbit.export.coreml import export_coreml, qtensor_to_coreml_op_inputs
from lowbit.formats import QTensor
from lowbit.nn import QuantLinear

# exports reproduce the stored weights in fp32: compared with the reference path, not the CPU bf16 kernels
pytestmark = pytest.mark.usefixtures("reference_linear")

CASES = [
    ("int8", {}),
    ("int4", {}),
    ("int8", {"block_size": 32}),
    ("int4-e8m0", {}),
    ("int2-e8m0", {}),
    ("lut4", {}),
    ("lut4", {"group_size": 8}),
    ("lut4", {"per_channel_scale": True}),
    ("lut3", {"group_size": 16}),
    ("lut2", {"lut_dtype": "int8", "per_channel_scale": True, "group_size": 16}),
]


@pytest.mark.parametrize("preset,kw", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_tensor_exact(preset, kw):
    torch.manual_seed(0)
    qt = lowbit.quantize_tensor(torch.randn(32, 64), preset, **kw)
    w = qtensor_to_coreml_op_inputs(qt, "fc")
    got = w.decompress()  # coremltools' constexpr_*.decompress
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, qt.dequantize().numpy())


def test_affine_exact_offset_and_refusal():
    torch.manual_seed(0)
    qt = lowbit.quantize_tensor(torch.randn(16, 64), "int4-asym")
    with pytest.raises(ValueError, match="int4-asym.*alternatives"):
        qtensor_to_coreml_op_inputs(qt, "fc")
    # zero an integer multiple of the scale (x4: exact in fp16): exact with a uint4 offset
    p = qt.planes
    p["zero"] = (-4 * p["scale"].float()).to(p["scale"].dtype)
    qt2 = QTensor(p, qt.fmt, qt.shape)
    w = qtensor_to_coreml_op_inputs(qt2, "fc")
    assert "uint4 offset" in w.description
    np.testing.assert_array_equal(w.decompress(), qt2.dequantize().numpy())


def test_refuses_mx():
    qt = lowbit.quantize_tensor(torch.randn(8, 64), "mxfp4")
    with pytest.raises(ValueError, match=r"'enc\.fc'.*mxfp4.*int8, int4"):
        qtensor_to_coreml_op_inputs(qt, "enc.fc")


def _mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    m[0] = QuantLinear.from_float(m[0], "int4")
    m[2] = QuantLinear.from_float(m[2], "lut4", per_channel_scale=True)
    return m


def test_export_mlp(tmp_path):
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    m = _mlp()
    out = tmp_path / "mlp.mlpackage"
    export_coreml(m, out, torch.randn(1, 64))
    ml = ct.models.MLModel(str(out), skip_model_load=True)
    prog = _convert_model_spec_to_pymil_prog(ml, ml.get_spec().specificationVersion, milproto_load)
    ops = list(prog.functions["main"].operations)
    # the ops feeding `linear` weights are constexpr ops; decompress them from the saved package
    weights = [op.weight.op for op in ops if op.op_type == "linear"]
    assert [w.op_type for w in weights] == ["constexpr_blockwise_shift_scale"] * 2
    assert weights[1].data.op.op_type == "constexpr_lut_to_dense"
    dense = [op for op in ops if op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray)
             and op.outputs[0].val.dtype == np.float32 and op.outputs[0].val.size >= 16 * 128]
    assert not dense  # no dense fp32 weight left behind
    for wop, q in zip(weights, (m[0], m[2])):
        np.testing.assert_array_equal(wop.materialized_val_inference(), q.qweight.dequantize().numpy())
    # weights file: codes at 4 bits + scales/LUT + biases (+ 64-byte aligned blob headers), far below fp32
    wbin = out / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    size = os.path.getsize(wbin)
    payload = 128 * 64 // 2 + 128 * 2 * 4 + 16 * 128 // 2 + 16 * 4 + 16 * 4 + (128 + 16) * 4
    assert payload <= size <= payload + 10 * 128, (size, payload)
    assert size < (128 * 64 + 16 * 128) * 4 / 5


def test_export_refuses_overwrite_and_unsupported(tmp_path):
    out = tmp_path / "mlp.mlpackage"
    out.mkdir()
    with pytest.raises(FileExistsError, match="force=True"):
        export_coreml(_mlp(), out, torch.randn(1, 64))
    m = nn.Sequential(QuantLinear.from_float(nn.Linear(64, 8), "mxfp4"))
    with pytest.raises(ValueError, match="mxfp4"):
        export_coreml(m, tmp_path / "x.mlpackage", torch.randn(1, 64))
    assert not (tmp_path / "x.mlpackage").exists()
    export_coreml(_mlp(), out, torch.randn(1, 64), force=True)
    assert (out / "Manifest.json").exists()


def test_export_embedding_module(tmp_path):
    """A plain module with a quantized embedding: the gather reads a constexpr-decompressed table."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    from lowbit.nn import QuantEmbedding

    torch.manual_seed(0)
    emb = QuantEmbedding(lowbit.quantize_tensor(torch.randn(100, 64), "lut3", group_size=10))
    m = nn.Sequential(emb, QuantLinear.from_float(nn.Linear(64, 32), "int8", block_size=32))
    out = tmp_path / "emb.mlpackage"
    r = export_coreml(m, out, torch.randint(0, 100, (1, 7)))
    assert r["tensors"]["0"]["target"] == "lut_to_dense u3 -> gather"
    ml = ct.models.MLModel(str(out), skip_model_load=True)
    prog = _convert_model_spec_to_pymil_prog(ml, ml.get_spec().specificationVersion, milproto_load)
    ops = list(prog.functions["main"].operations)
    table = next(op for op in ops if op.op_type == "gather").x.op
    assert table.op_type == "constexpr_lut_to_dense"
    np.testing.assert_array_equal(table.materialized_val_inference(), emb.qweight.dequantize().numpy())
    lin = next(op for op in ops if op.op_type == "linear").weight.op
    np.testing.assert_array_equal(lin.materialized_val_inference(), m[1].qweight.dequantize().numpy())
