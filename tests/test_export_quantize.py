"""int8 and int4 exports (MatMulNBits) and the internal standard-op int8 (MatMulInteger): they validate against
float32 torch, their graphs really run quantized weights, the stored weights dequantize to the checkpoint's within
the quantization's rounding (checked here with numpy, independently of the exporter), the token lookup reads the
output projection's own bytes, the free-space check counts the quantized bytes, bad options and a shard truncated
mid-export are refused, and an int4 export stays within the streaming memory bound (the export itself; see the test
for validation's side)."""

import json
import shutil
import sys

import numpy as np
import onnx
import pytest
from PIL import Image
from safetensors.numpy import load_file
from test_export_streaming import BOUND, peak_rss_kb, quiet, weight_heavy  # noqa: F401 (a fixture)

import paligemma
from export.__main__ import main
from export.runtime import export_and_validate
from export.writer import onnx_export
from export.writer.manifest import MANIFEST_NAME, SHARED_DATA_NAME
from paligemma.errors import CheckpointError, OnnxExportError
from paligemma.weights import canonical_key

IMAGE = Image.new("RGB", (40, 30), (30, 160, 90))
QUANTIZED_OPS = {"int8": "MatMulNBits", "int4": "MatMulNBits", "int8_standard": "MatMulInteger"}
BLOCKS = {"int8": 32, "int4": 32}  # (bits, block) the exporter documents for its MatMulNBits schemes
BITS = {"int8": 8, "int4": 4}


@pytest.fixture(scope="module", params=[(variant, scheme) for variant in ("pg1", "pg2")
                                        for scheme in ("int8", "int4", "int8_standard")], ids=lambda p: "-".join(p))
def exported(request, reference_factory, tmp_path_factory):
    variant, scheme = request.param
    folder, _ = reference_factory(variant)
    out = tmp_path_factory.mktemp(f"{variant}_{scheme}")
    lines = []
    export_and_validate(folder, out, quantize=scheme, progress=False, log=lines.append)  # raises above tolerance
    return folder, out, scheme, lines


def graph(out, name):
    return onnx.load(str(out / f"{name}.onnx"), load_external_data=False)


def test_each_variant_validates_and_generates(exported):
    folder, out, scheme, lines = exported
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (manifest["dtype"], manifest["quantize"]) == ("float32", scheme)
    for name in ("vision_encoder", "prefill", "decode"):
        assert any(line.startswith(f"validation {name}: max abs diff") for line in lines)
    result = paligemma.load(folder, backend="onnx", onnx_dir=out).generate(IMAGE, "caption en", max_new_tokens=6)
    assert len(result.token_ids) > 0


def test_every_weight_matmul_is_quantized(exported):
    _, out, scheme, _ = exported
    for name in ("vision_encoder", "prefill", "decode"):
        g = graph(out, name).graph
        initializers = {t.name for t in g.initializer}
        ops = [n.op_type for n in g.node]
        assert ops.count(QUANTIZED_OPS[scheme]) >= (6 if name == "vision_encoder" else 7)  # a layer's matrices at least
        float_weight_matmuls = [n.name for n in g.node
                                if n.op_type in ("MatMul", "Gemm") and n.input[1] in initializers]
        assert float_weight_matmuls == []
        if name != "vision_encoder":  # the output projection on the embedding too
            assert any(n.op_type == QUANTIZED_OPS[scheme] and "embed_tokens" in n.input[1] for n in g.node)
            if scheme == "int8_standard":  # the lookup stays float: no gather reads MatMulInteger's transposed B
                assert any(n.op_type == "Gather" and n.input[0].endswith("embed_tokens.weight") for n in g.node)
            else:  # the lookup reads the projection's own blocks: the embedding is stored once
                lookup = [n for n in g.node if n.op_type == "GatherBlockQuantized"]
                projection = next(n for n in g.node if n.op_type == "MatMulNBits" and "embed_tokens" in n.input[1])
                assert len(lookup) == 1 and lookup[0].input[0] == projection.input[1]
                assert onnx.helper.get_attribute_value(
                    next(a for a in lookup[0].attribute if a.name == "bits")) == BITS[scheme]
                assert not any(i.endswith("embed_tokens.weight") for i in initializers)
        for node in (n for n in g.node if n.op_type == "MatMulNBits"):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attributes["bits"], attributes["block_size"], attributes["accuracy_level"]) == (
                BITS[scheme], BLOCKS[scheme], 4)
    tensors = json.loads((out / MANIFEST_NAME).read_text())["shared_data"]["tensors"]
    assert {e["data_type"] for e in tensors.values()} >= {onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT}


def stored_tensors(out) -> dict[str, np.ndarray]:
    """Every tensor of the export by name: the shared data file read through the manifest, and the vision graph's."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    data = np.fromfile(out / SHARED_DATA_NAME, dtype=np.uint8)
    tensors = {}
    for name, entry in manifest["shared_data"]["tensors"].items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(entry["data_type"])
        tensors[name] = data[entry["offset"]: entry["offset"] + entry["length"]].view(dtype).reshape(entry["shape"])
    vision = onnx.load(str(out / "vision_encoder.onnx"))
    tensors.update({t.name: onnx.numpy_helper.to_array(t) for t in vision.graph.initializer})
    return tensors


def test_dequantized_weights_equal_the_checkpoint_within_the_rounding(exported):
    folder, out, scheme, _ = exported
    checkpoint = {canonical_key(k): v.astype(np.float32) for k, v in load_file(folder / "model.safetensors").items()}
    tensors = stored_tensors(out)
    quantized = [n for n in tensors if n.endswith(f"_{scheme}")]
    linear = [k for k, v in checkpoint.items() if v.ndim == 2 and k.endswith(("proj.weight", "fc1.weight", "fc2.weight",
                                                                              "linear.weight"))]
    assert len(quantized) == len(linear) + 1  # every linear weight and the output projection, each stored once
    for name in quantized:
        weight = checkpoint[name.removeprefix("model.").removesuffix(f"_{scheme}")]  # [N, K]
        q, scale = tensors[name], tensors[name + "_scale"]
        if scheme == "int8_standard":  # [K, N] uint8 around 128, one scale per output channel
            assert q.dtype == np.uint8 and q.shape == weight.T.shape
            step = scale[:, None]
            error = np.abs((q.T.astype(np.float32) - 128) * step - weight)
            assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-12), name
            continue
        # [N, blocks, block * bits / 8] uint8 (4 bits: two values a byte, low nibble first), zero point
        # 2^(bits - 1), a scale per block
        N, K = weight.shape
        bits, block = BITS[scheme], BLOCKS[scheme]
        blocks, zero = -(-K // block), 2 ** (bits - 1)
        assert q.dtype == np.uint8 and q.shape == (N, blocks, block * bits // 8) and scale.shape == (N, blocks)
        values = np.empty((N, blocks, block), np.float32)
        if bits == 4:
            values[..., 0::2], values[..., 1::2] = q & 0x0F, q >> 4
        else:
            values[:] = q
        padded = np.zeros((N, blocks * block), np.float32)
        padded[:, :K] = weight
        padded = padded.reshape(N, blocks, block)
        step = np.broadcast_to(np.abs(scale)[..., None], padded.shape)
        error = np.abs((values - zero) * scale[..., None] - padded)
        # the block's largest magnitude sits on -zero steps; on the other side zero - 1 is the last level, so values
        # past zero - 0.5 steps are clipped there (within one step), every other value within half a step
        clipped = padded / scale[..., None] > zero - 0.5
        assert np.all(error[~clipped] <= step[~clipped] / 2 * (1 + 1e-5) + 1e-12), name
        assert np.all(error[clipped] <= step[clipped] * (1 + 1e-5)), name
        largest = np.abs(padded).max(axis=2)  # lands on a level exactly: the scale is the block's own
        np.testing.assert_allclose(np.abs(scale)[largest > 0] * zero, largest[largest > 0], rtol=1e-6)
        assert np.all(values.reshape(N, -1)[:, K:] == zero)  # the padding is zero


def test_a_width_that_is_not_a_multiple_of_the_block_is_padded(exported):
    _, out, scheme, _ = exported
    if scheme not in BLOCKS:
        pytest.skip("MatMulNBits blocks only")
    # the tiny vision MLP's fc2 reads 48 inputs: one full block of 32 and one padded (the values the test above
    # checks are zero), and the node keeps the true width
    (fc2,) = [n for n in graph(out, "vision_encoder").graph.node
              if n.op_type == "MatMulNBits" and "layers.0.mlp.fc2" in n.input[1]]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in fc2.attribute}
    assert (attributes["K"], attributes["N"], attributes["block_size"]) == (48, 32, BLOCKS[scheme])
    assert 48 % BLOCKS[scheme]


def test_an_unknown_quantization_is_refused(reference_factory, tmp_path, capsys):
    folder, _ = reference_factory("pg1")
    with pytest.raises(SystemExit) as exit_code:
        main(["--model", str(folder), "--output", str(tmp_path / "out"), "--quantize", "int3"])
    assert exit_code.value.code == 2
    assert "int3" in capsys.readouterr().err
    with pytest.raises(OnnxExportError, match="quantize 'int3' is not supported; use int8 or int4"):
        onnx_export.export_model(folder, tmp_path / "out", quantize="int3", progress=False, log=quiet)
    with pytest.raises(OnnxExportError, match="drop --dtype float16 or --quantize int4 .*q4f16: add --format "
                       "transformers.js"):
        onnx_export.export_model(folder, tmp_path / "out", dtype="float16", quantize="int4", progress=False, log=quiet)
    with pytest.raises(OnnxExportError, match="drop --dtype float16 or --quantize int8$"):
        onnx_export.export_model(folder, tmp_path / "out", dtype="float16", quantize="int8", progress=False, log=quiet)
    assert not (tmp_path / "out").exists()


def test_a_shard_truncated_during_an_int4_export_is_named_and_the_partial_export_removed(tmp_path, monkeypatch):
    from tiny import build_reference

    folder = tmp_path / "pg1"
    build_reference(folder, "pg1")
    shard = folder / "model.safetensors"
    trace = onnx_export.trace_to_onnx

    def truncate_before_the_decoder(module, inputs, spec, *args, **kwargs):
        if spec.name == "prefill":
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size // 2)
        return trace(module, inputs, spec, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "trace_to_onnx", truncate_before_the_decoder)
    out = tmp_path / "onnx"
    with pytest.raises(CheckpointError, match=rf"{shard} ended inside tensor .*truncated"):
        onnx_export.export_model(folder, out, quantize="int4", progress=False, log=quiet)
    assert not out.exists()


def test_an_int4_export_with_validation_stays_within_the_weights_bound(weight_heavy, tmp_path):  # noqa: F811
    # The lookup reads the int4 blocks (GatherBlockQuantized) and MatMulNBits runs pre-packed, so ONNX Runtime holds
    # about an eighth of the float weights; the peak is the float32 torch reference (docs/quantization.md).
    out = tmp_path / "onnx"
    baseline = peak_rss_kb([sys.executable, "-c",
                            "import export.writer.onnx_export, export.runtime, export.validation.torch_reference"])
    peak = peak_rss_kb([sys.executable, "-m", "export", "--model", str(weight_heavy), "--output", str(out),
                        "--quantize", "int4"])
    assert json.loads((out / MANIFEST_NAME).read_text())["quantize"] == "int4"
    float_bytes = sum(f.stat().st_size for f in weight_heavy.glob("*.safetensors"))  # a float32 source
    assert float_bytes > 500e6
    # the embedding (94% of this model) is stored once, in 4 bits: no float copy for the lookup
    assert (out / SHARED_DATA_NAME).stat().st_size < 0.2 * float_bytes
    added = (peak - baseline) * 1024
    assert added <= BOUND * float_bytes, f"{added / 1e6:.0f} MB above the baseline for {float_bytes / 1e6:.0f} MB"


def stored_bytes(out) -> int:
    """The bytes of the tensors an export stores, each once (an alias of a shared tensor is not counted again)."""
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    shared = {(e["offset"], e["length"]) for e in manifest["shared_data"]["tensors"].values()}
    graphs = [graph(out, name) for name in ("vision_encoder", "prefill", "decode")]
    inline = {t.name: onnx.numpy_helper.to_array(t).nbytes for g in graphs for t in g.graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL}
    return sum(length for _, length in shared) + sum(inline.values())


@pytest.mark.parametrize("scheme", ["int8", "int4", "int8_standard"])
def test_the_free_space_check_counts_the_quantized_bytes(scheme, reference_factory, tmp_path, monkeypatch):
    folder, _ = reference_factory("pg2")
    float_bytes = (folder / "model.safetensors").stat().st_size
    out = tmp_path / scheme
    usage = shutil.disk_usage(tmp_path)
    free = {"bytes": usage.free}
    monkeypatch.setattr(onnx_export.shutil, "disk_usage", lambda path: usage._replace(free=free["bytes"]))
    onnx_export.export_model(folder, out, quantize=scheme, progress=False, log=quiet)
    written = stored_bytes(out)
    assert written < 0.8 * float_bytes  # the standard scheme keeps a float embedding for its lookup
    estimate = {}
    check = onnx_export.check_free_space
    monkeypatch.setattr(onnx_export, "check_free_space", lambda output, needed: (estimate.setdefault(scheme, needed),
                                                                                 check(output, needed)))
    # a disk with room for the quantized weights but not for float32 ones: the quantized export goes ahead
    free["bytes"] = int(1.1 * written)
    shutil.rmtree(out)
    onnx_export.export_model(folder, out, quantize=scheme, progress=False, log=quiet)
    assert abs(estimate[scheme] - written) <= 0.01 * written, (estimate, written)  # shape constants: not weights
    with pytest.raises(OnnxExportError, match="the export needs about .* GB for its weights"):
        onnx_export.export_model(folder, tmp_path / "float32", progress=False, log=quiet)
    assert not (tmp_path / "float32").exists()
