"""`python -m export --format transformers.js`: the layout, this project's ONNX Runtime loop over it against torch
(padded batches included), and transformers.js itself (Node, demo/web/generate.mjs) against torch, on the embedded
model and tiny PaliGemma 1 (head_dim 24 != 64 / 4) and 2 (sliding window 6, shorter than every prompt; softcaps);
the int8, int4 and q4f16 variants; the embedding split into row blocks when it exceeds a chunk."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from npm import npm_packages
from PIL import Image

import paligemma
from export.__main__ import main as export_main
from export.transformers_js.runtime import TransformersJsModel, export_transformers_js_checked
from export.transformers_js.writer import export_transformers_js
from export.writer.checkpoint_stream import CheckpointStream
from export.writer.external_data import ALIGNMENT
from paligemma.checkpoint import Checkpoint
from paligemma.errors import CheckpointError, OnnxExportError

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "demo" / "web"
EMBEDDED = ROOT / "paligemma" / "demo_checkpoint"
PROMPTS = ["caption en", "answer en what is in the image and where is it"]
STEPS = 16


def quiet(*_):
    pass


def image(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def requests(name: str):
    """(image, prompt) pairs: the demo's scenes for the embedded model, random pixels for the tiny ones."""
    if name == "embedded":
        scenes = [Image.open(ROOT / "demo" / "examples" / f"scene_0{i}.png") for i in range(2)]
        return [(scenes[0], "caption en"), (scenes[1], "detect red circle"), (scenes[1], "caption en")]
    return [(image(seed), prompt) for seed, prompt in enumerate(PROMPTS)]


@pytest.fixture(scope="module", params=["embedded", "pg1", "pg2"])
def exported(request, reference_factory, tmp_path_factory):
    """(name, checkpoint folder, export folder, torch pipeline, pipeline on the export)."""
    folder = EMBEDDED if request.param == "embedded" else reference_factory(request.param)[0]
    out = tmp_path_factory.mktemp(f"{request.param}_tjs")
    export_transformers_js(folder, out, progress=False, log=quiet)
    return request.param, folder, out, paligemma.load(folder), paligemma.load(out, backend="onnx")


def node_generate(model: Path, pixel_values, prompt: str, tmp_path: Path, max_new_tokens: int = STEPS, *extra):
    """transformers.js' greedy tokens (and its input ids) for these exact pixel values."""
    npm_packages()
    pixels = tmp_path / "pixels.bin"
    pixel_values.numpy().astype("<f4").tofile(pixels)
    done = subprocess.run(["node", str(WEB / "generate.mjs"), "--model", str(model), "--pixels", str(pixels),
                           "--prompt", prompt, "--max-new-tokens", str(max_new_tokens), *extra],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_folder_is_transformers_js_layout(exported):
    _, _, out, torch_pipe, _ = exported
    config = torch_pipe.config
    content = json.loads((out / "config.json").read_text())
    assert content["model_type"] == "paligemma" and content["image_token_index"] == config.image_token_index
    text = content["text_config"]
    assert (text["head_dim"], text["num_key_value_heads"]) == (config.text.head_dim, config.text.num_key_value_heads)
    counts = content["transformers.js_config"]["use_external_data_format"]
    for name in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        chunks = sorted(p.name for p in (out / "onnx").glob(f"{name}.onnx_data*"))
        assert counts[f"{name}.onnx"] == len(chunks) >= 1
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["image_seq_length"] == config.num_image_tokens and pre["resample"] == 3
    assert pre["size"] == {"height": config.image_size, "width": config.image_size}
    decoder = onnx.load(str(out / "onnx" / "decoder_model_merged.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in decoder.input}
    assert list(inputs)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]  # no token_type_ids
    K, D = config.text.num_key_value_heads, config.text.head_dim
    assert inputs["past_key_values.0.key"] == ["batch_size", K, "past_sequence_length", D]
    assert [o.name for o in decoder.output][:2] == ["logits", "present.0.key"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).exists()
    assert not list(out.glob(".staging-*"))


def test_the_layout_carries_the_mask_decoder_when_the_checkpoint_ships_one(exported):
    """mask_decoder.onnx beside the graphs, listed in config.json (the page reads it there), and this project's loop
    on the layout decodes with it: torch's logits within 1e-4 on fixed codes."""
    from export.writer.mask_decoder import OnnxMaskDecoder

    _, _, out, torch_pipe, tjs_pipe = exported
    listed = json.loads((out / "config.json").read_text())["transformers.js_config"].get("mask_decoder")
    if torch_pipe.mask_decoder is None:  # the tiny checkpoints ship none
        assert listed is None and tjs_pipe.mask_decoder is None and not (out / "onnx" / "mask_decoder.onnx").exists()
        return
    assert listed == {"file": "mask_decoder.onnx", "inputs": {"codes": ["batch", 16]},
                      "outputs": {"mask_logits": ["batch", 64, 64]}}
    assert isinstance(tjs_pipe.mask_decoder, OnnxMaskDecoder)
    assert tjs_pipe.mask_decoder.path == out / "onnx" / "mask_decoder.onnx"
    codes = np.stack([np.arange(16) * 8, np.full(16, 127), np.random.default_rng(1).integers(0, 128, 16)])
    expected = torch_pipe.mask_decoder.mask_logits(codes)
    assert np.abs(tjs_pipe.mask_decoder.mask_logits(codes) - expected).max() <= 1e-4
    assert (expected > 0).any() and (expected < 0).any()  # real masks, not a constant


def test_a_listed_mask_decoder_that_is_missing_is_reported(exported, tmp_path):
    name, _, out, _, _ = exported
    if name != "embedded":
        pytest.skip("only the embedded checkpoint ships a mask decoder")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "onnx" / "mask_decoder.onnx").unlink()
    with pytest.raises(OnnxExportError, match="lists the mask decoder .*mask_decoder.onnx, which is missing"):
        paligemma.load(copy, backend="onnx")


def test_onnx_runtime_logits_match_torch_on_the_export(exported):
    _, _, _, torch_pipe, tjs_pipe = exported
    assert isinstance(tjs_pipe.engine_factory, TransformersJsModel)
    inputs = torch_pipe.processor([image(1)], [PROMPTS[1]])
    window = torch_pipe.config.text.sliding_window
    if window is not None:
        assert inputs["input_ids"].shape[1] > window + 10  # the window cuts into the prompt
    torch_engine, engine = torch_pipe.engine_factory(), tjs_pipe.engine_factory()
    expected, got = torch_engine.prefill(inputs, STEPS), engine.prefill(inputs, STEPS)
    assert (got - expected).abs().max().item() <= 1e-4
    for _ in range(STEPS):
        tokens = expected.argmax(-1)
        expected, got = torch_engine.decode_step(tokens), engine.decode_step(tokens)
        assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_match_torch_one_at_a_time_and_in_a_padded_batch(exported):
    name, _, _, torch_pipe, tjs_pipe = exported
    pairs = requests(name)
    images, prompts = [i for i, _ in pairs], [p for _, p in pairs]
    expected = [torch_pipe.generate(i, p, max_new_tokens=STEPS).token_ids for i, p in pairs]
    assert [tjs_pipe.generate(i, p, max_new_tokens=STEPS).token_ids for i, p in pairs] == expected
    batch = tjs_pipe.processor(images, prompts)
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: left padding
    assert [r.token_ids for r in tjs_pipe.generate(images, prompts, max_new_tokens=STEPS)] == expected


def test_transformers_js_in_node_gives_torch_tokens(exported, tmp_path):
    name, _, out, torch_pipe, _ = exported
    for picture, prompt in requests(name):
        expected = torch_pipe.generate(picture, prompt, max_new_tokens=STEPS)
        inputs = torch_pipe.processor([picture], [prompt])
        got = node_generate(out, inputs["pixel_values"], prompt, tmp_path)
        assert got["input_ids"] == inputs["input_ids"][0].tolist()  # transformers.js' processor builds our ids
        tokens = got["tokens"]
        if len(expected.token_ids) < STEPS:  # stopped early: transformers.js keeps the <eos> it stopped on
            assert tokens[-1] in torch_pipe.stop_ids
            tokens = tokens[:-1]
        assert tokens == expected.token_ids, prompt


def test_weights_split_into_chunks_load_in_onnx_runtime_and_transformers_js(reference_factory, tmp_path):
    folder, _ = reference_factory("pg2")
    out = tmp_path / "chunked"
    source = CheckpointStream(Checkpoint.resolve(folder))
    chunk = max(source.nbytes(name, torch.float32) for name in source.tensors) + 2 * ALIGNMENT
    export_transformers_js(folder, out, chunk_bytes=chunk, progress=False, log=quiet)
    counts = json.loads((out / "config.json").read_text())["transformers.js_config"]["use_external_data_format"]
    files = [f"decoder_model_merged.onnx_data{suffix}" for suffix in ["", "_1", "_2"]]
    assert counts["decoder_model_merged.onnx"] == len(list((out / "onnx").glob("decoder_model_merged.onnx_data*"))) >= 3
    assert all((out / "onnx" / f).stat().st_size <= chunk for f in files)
    torch_pipe = paligemma.load(folder)
    picture, prompt = image(0), PROMPTS[0]
    expected = torch_pipe.generate(picture, prompt, max_new_tokens=STEPS).token_ids
    assert paligemma.load(out, backend="onnx").generate(picture, prompt, max_new_tokens=STEPS).token_ids == expected
    got = node_generate(out, torch_pipe.processor([picture], [prompt])["pixel_values"], prompt, tmp_path)
    assert got["tokens"][: len(expected)] == expected


def test_another_tensor_larger_than_a_chunk_is_refused_and_nothing_is_left(reference_factory, tmp_path):
    """The patch embedding (75 kB) is neither a lookup nor a projection: it cannot be cut into row blocks."""
    folder, _ = reference_factory("pg1")
    out = tmp_path / "out"
    with pytest.raises(OnnxExportError, match="patch_embedding.*--dtype float16"):
        export_transformers_js(folder, out, chunk_bytes=4096, progress=False, log=quiet)
    assert not out.exists()


def test_float16_variant_keeps_float32_io_validates_and_sits_beside_float32(reference_factory, tmp_path):
    folder, _ = reference_factory("pg2")
    out = tmp_path / "out"
    export_transformers_js(folder, out, progress=False, log=quiet)
    export_transformers_js_checked(folder, out, dtype="float16", progress=False, log=quiet)
    counts = json.loads((out / "config.json").read_text())["transformers.js_config"]["use_external_data_format"]
    assert {"decoder_model_merged.onnx", "decoder_model_merged_fp16.onnx"} <= set(counts)
    graph = onnx.load(str(out / "onnx" / "decoder_model_merged_fp16.onnx"), load_external_data=False).graph
    float32 = onnx.TensorProto.FLOAT
    assert {i.type.tensor_type.elem_type for i in graph.input
            if i.name != "attention_mask" and "ids" not in i.name} == {float32}
    assert {o.type.tensor_type.elem_type for o in graph.output} == {float32}
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
    model = TransformersJsModel(out, paligemma.load(folder).config, dtype="float16")
    assert model.manifest["dtype"] == "float16"


def test_a_truncated_checkpoint_fails_and_leaves_nothing(reference_factory, tmp_path):
    source, _ = reference_factory("pg1")
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError):
        export_transformers_js(folder, out, progress=False, log=quiet)
    assert not out.exists()


def test_the_command_writes_the_layout_and_validates_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main(["--model", str(EMBEDDED), "--output", str(out), "--format", "transformers.js"]) == 0
    assert "validation decode" in capsys.readouterr().out
    assert (out / "onnx" / "decoder_model_merged.onnx").exists()


def test_the_embedded_models_float16_files_give_torch_tokens_in_both_loops(tmp_path):
    """The trained model's answers are far from ties, so float16 weights keep float32 torch's greedy tokens."""
    out = tmp_path / "fp16"
    export_transformers_js(EMBEDDED, out, dtype="float16", progress=False, log=quiet)
    assert sorted(p.name for p in (out / "onnx").glob("*.onnx")) == [
        "decoder_model_merged_fp16.onnx", "embed_tokens_fp16.onnx", "mask_decoder.onnx",  # float32 in every variant
        "vision_encoder_fp16.onnx"]
    torch_pipe = paligemma.load()
    pipe = paligemma.load(out, backend="onnx")
    assert pipe.engine_factory.manifest["dtype"] == "float16"
    for picture, prompt in requests("embedded"):
        expected = torch_pipe.generate(picture, prompt, max_new_tokens=STEPS).token_ids
        assert pipe.generate(picture, prompt, max_new_tokens=STEPS).token_ids == expected
        pixel_values = torch_pipe.processor([picture], [prompt])["pixel_values"]
        got = node_generate(out, pixel_values, prompt, tmp_path, STEPS, "--dtype", "fp16")
        assert got["tokens"][: len(expected)] == expected and len(got["tokens"]) == len(expected) + 1, prompt


NBITS_OPS = {"vision_encoder": "MatMulNBits", "embed_tokens": "GatherBlockQuantized",
             "decoder_model_merged": "MatMulNBits"}


@pytest.mark.parametrize("quantize, dtype, name, suffix, ops", [
    ("int8", "float32", "q8", "_quantized",
     {"vision_encoder": "MatMulInteger", "decoder_model_merged": "MatMulInteger"}),
    ("int4", "float32", "q4", "_q4", NBITS_OPS),
    ("int4", "float16", "q4f16", "_q4f16", NBITS_OPS),
])
def test_quantized_variants_validate_and_give_the_same_tokens_in_transformers_js_and_this_loop(
        quantize, dtype, name, suffix, ops, tmp_path, capsys):
    """The command validates the variant against float32 torch (export/validation/validate.py: the documented int8 /
    int4 / int4_float16 tolerance); transformers.js, given the variant's name, loads its files and gives this project's
    loop's tokens on them (q4f16 included: onnxruntime-node's CPU provider has float16 MatMulNBits)."""
    from export.transformers_js.runtime import load_transformers_js_pipeline

    out = tmp_path / "out"
    export_main(["--model", str(EMBEDDED), "--output", str(out), "--format", "transformers.js", "--no-validate"])
    assert export_main(["--model", str(EMBEDDED), "--output", str(out), "--format", "transformers.js",
                        "--quantize", quantize, "--dtype", dtype]) == 0
    assert "validation decode" in capsys.readouterr().out
    counts = json.loads((out / "config.json").read_text())["transformers.js_config"]["use_external_data_format"]
    for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        file = f"{graph}{suffix}.onnx"
        assert counts[file] == len(list((out / "onnx").glob(f"{file}_data*"))) >= 1
        assert counts[f"{graph}.onnx"] >= 1  # the float32 variant beside it keeps its entry
        nodes = onnx.load(str(out / "onnx" / file), load_external_data=False).graph.node
        if graph in ops:
            assert ops[graph] in {n.op_type for n in nodes}, graph
    pipe = load_transformers_js_pipeline(out, dtype=dtype, quantize=quantize)
    assert (pipe.engine_factory.variant.name, pipe.engine_factory.variant.suffix) == (name, suffix)
    torch_pipe = paligemma.load()
    for picture, prompt in requests("embedded"):
        expected = pipe.generate(picture, prompt, max_new_tokens=STEPS).token_ids
        pixel_values = torch_pipe.processor([picture], [prompt])["pixel_values"]
        got = node_generate(out, pixel_values, prompt, tmp_path, STEPS, "--dtype", name)
        assert got["tokens"][: len(expected)] == expected and len(got["tokens"]) == len(expected) + 1, prompt


def test_q4f16_is_a_float16_graph_with_float16_scales_and_float32_io(reference_factory, tmp_path):
    """transformers.js copies the image features into embed_tokens' output and feeds its own float32 pixel values,
    so the variant keeps float32 inputs and outputs; inside, the weights, the activations and MatMulNBits' and
    GatherBlockQuantized's scales are float16 (the ops take their scales in the activations' type)."""
    folder, _ = reference_factory("pg2")
    out = tmp_path / "out"
    export_transformers_js(folder, out, dtype="float16", quantize="int4", progress=False, log=quiet)
    for graph_name in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        graph = onnx.load(str(out / "onnx" / f"{graph_name}_q4f16.onnx"), load_external_data=True).graph
        floats = {i.type.tensor_type.elem_type for i in [*graph.input, *graph.output]} - {onnx.TensorProto.INT64}
        assert floats == {onnx.TensorProto.FLOAT}, graph_name
        types = {t.name: t.data_type for t in graph.initializer}
        quantized = [n for n in graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
        assert quantized, graph_name
        for node in quantized:
            scale = node.input[2]
            assert types[scale] == onnx.TensorProto.FLOAT16, (graph_name, node.name)
        assert not any(t.data_type == onnx.TensorProto.FLOAT and t.dims and np.prod(t.dims) > 64
                       for t in graph.initializer), graph_name  # no float32 weight left
    with pytest.raises(OnnxExportError, match="no transformers.js variant"):
        export_transformers_js(folder, tmp_path / "other", dtype="float16", quantize="int8", progress=False, log=quiet)


def test_a_lookup_and_projection_larger_than_a_chunk_are_row_blocks_equal_to_the_whole(reference_factory, tmp_path):
    folder, _ = reference_factory("pg1")
    chunk = 100_000  # the embedding is 425,984 bytes (5 blocks); every other tensor fits
    whole, split = tmp_path / "whole", tmp_path / "split"
    export_transformers_js(folder, whole, progress=False, log=quiet)
    export_transformers_js(folder, split, chunk_bytes=chunk, progress=False, log=quiet)
    assert all(p.stat().st_size <= chunk for p in (split / "onnx").glob("*.onnx_data*"))
    lookup = onnx.load(str(split / "onnx" / "embed_tokens.onnx"), load_external_data=False).graph
    decoder = onnx.load(str(split / "onnx" / "decoder_model_merged.onnx"), load_external_data=False).graph
    assert [n.op_type for n in lookup.node].count("Gather") == 5
    assert sum(n.op_type == "Gemm" and "embed_tokens" in n.input[1] for n in decoder.node) == 5
    torch_pipe = paligemma.load(folder)
    pipes = [paligemma.load(out, backend="onnx") for out in (whole, split)]
    inputs = torch_pipe.processor([image(1), image(2)], PROMPTS)
    engines = [pipe.engine_factory() for pipe in pipes]
    logits = [engine.prefill(inputs, STEPS) for engine in engines]
    for _ in range(STEPS):
        assert torch.equal(logits[0], logits[1])
        tokens = torch.randint(0, torch_pipe.config.text.vocab_size, (2,))  # ids from every block
        logits = [engine.decode_step(tokens) for engine in engines]
    picture, prompt = image(0), PROMPTS[1]
    expected = torch_pipe.generate(picture, prompt, max_new_tokens=STEPS).token_ids
    assert pipes[1].generate(picture, prompt, max_new_tokens=STEPS).token_ids == expected
    got = node_generate(split, torch_pipe.processor([picture], [prompt])["pixel_values"], prompt, tmp_path)
    assert got["tokens"][: len(expected)] == expected
