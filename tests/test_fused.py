"""The fused prefill and decode graphs (export/runtime/fused.py) and the in-place cache of OnnxEngine, against this
project's torch model on tiny random PaliGemma 1 and 2 checkpoints (head_dim 32: GroupQueryAttention's rotary needs a
multiple of 16; PaliGemma 2's sliding window, 6, is shorter than every prompt, and it has both softcaps)."""

import threading

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from tiny import build_reference

import paligemma
from export.runtime import fused
from export.runtime.fused import LOOKUP_SUFFIX, PAGE, fused_model, left_padded, unsupported
from export.runtime.pipeline import OnnxModel, export_and_validate
from export.transformers_js.writer import export_transformers_js
from paligemma.errors import InputError

PROMPTS = ["caption en", "answer en what is in the image and where is it"]
STEPS = 16


def image(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def pipes(request, tmp_path_factory):
    """(torch pipeline, onnx pipeline with the fused decode graph, its OnnxModel with the graph as exported)."""
    folder = tmp_path_factory.mktemp(f"fused_{request.param}")
    build_reference(folder, request.param, text=dict(head_dim=32))
    onnx_dir = tmp_path_factory.mktemp(f"fused_{request.param}_onnx")
    export_and_validate(folder, onnx_dir, progress=False, log=lambda *_: None)  # validated through the fused graph
    onnx_pipe = paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir)
    assert onnx_pipe.engine_factory.fused is not None
    exported = OnnxModel(onnx_dir, onnx_pipe.config, fused=False)
    assert exported.fused is None
    return paligemma.load(folder), onnx_pipe, exported


def run_steps(engine, inputs, logits_from, steps=STEPS):
    """Prefill and `steps` greedy decode steps fed the reference's tokens; the logits of every step, kept as
    returned (as the app's torch check keeps them: each step's must stay its own)."""
    out = [engine.prefill(inputs, steps)]
    for i in range(steps):
        out.append(engine.decode_step(logits_from[i].argmax(-1)))
    return out


@pytest.mark.parametrize("batch", ["single", "padded"])
def test_fused_logits_match_torch(pipes, batch):
    torch_pipe, onnx_pipe, _ = pipes
    images, prompts = ([image(1)], [PROMPTS[1]]) if batch == "single" else ([image(4), image(5, 64, 48)], PROMPTS)
    inputs = torch_pipe.processor(images, prompts)
    window = torch_pipe.config.text.sliding_window
    if window is not None:
        assert inputs["input_ids"].shape[1] > window + 10  # the window cuts into the prompt
    if batch == "padded":
        assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # the first row is padded
    torch_engine = torch_pipe.engine_factory()
    expected = [torch_engine.prefill(inputs, STEPS)]
    for i in range(STEPS):
        expected.append(torch_engine.decode_step(expected[-1].argmax(-1)))
    engine = onnx_pipe.engine_factory()
    got = run_steps(engine, inputs, expected)
    assert engine.fused
    for step, (e, g) in enumerate(zip(expected, got)):
        assert (g - e).abs().max().item() <= 1e-4, f"step {step}"


def test_fused_greedy_and_seeded_tokens_match_torch(pipes):
    torch_pipe, onnx_pipe, _ = pipes
    for seed, prompt in enumerate(PROMPTS):
        ours = onnx_pipe.generate(image(seed), prompt, max_new_tokens=STEPS)
        assert len(ours.token_ids) > 4
        assert ours.token_ids == torch_pipe.generate(image(seed), prompt, max_new_tokens=STEPS).token_ids
    kwargs = dict(max_new_tokens=STEPS, do_sample=True, temperature=1.5, top_p=0.9)
    outputs = []
    for seed in (7, 8):
        got = onnx_pipe.generate(image(3), PROMPTS[0], seed=seed, **kwargs)
        assert got.token_ids == torch_pipe.generate(image(3), PROMPTS[0], seed=seed, **kwargs).token_ids
        outputs.append(got.token_ids)
    assert outputs[0] != outputs[1]  # the seed matters, so equality above is not luck
    images = [image(4), image(5, 64, 48)]
    ours = onnx_pipe.generate(images, PROMPTS, max_new_tokens=STEPS)
    assert [r.token_ids for r in ours] == [r.token_ids for r in torch_pipe.generate(images, PROMPTS,
                                                                                      max_new_tokens=STEPS)]


def test_fused_and_exported_graphs_give_the_same_logits(pipes):
    torch_pipe, onnx_pipe, exported = pipes
    inputs = torch_pipe.processor([image(4), image(5, 64, 48)], PROMPTS)
    reference = run_steps(exported(), inputs, [torch.zeros(2, 1)] * STEPS)  # token 0 every step
    fused = onnx_pipe.engine_factory()
    got = run_steps(fused, inputs, [torch.zeros(2, 1)] * STEPS)
    assert fused.fused
    assert max((g - r).abs().max().item() for g, r in zip(got, reference)) <= 1e-4


def test_generation_past_the_preallocated_cache_is_refused(pipes):
    torch_pipe, onnx_pipe, _ = pipes
    inputs = torch_pipe.processor([image(2)], [PROMPTS[0]])
    engine = onnx_pipe.engine_factory()
    logits = engine.prefill(inputs, 3)
    for _ in range(3):
        logits = engine.decode_step(logits.argmax(-1))
    with pytest.raises(InputError, match="cache holds .* max_new_tokens"):
        engine.decode_step(logits.argmax(-1))


def test_concurrent_generations_do_not_share_buffers(pipes):
    torch_pipe, onnx_pipe, _ = pipes
    requests = [(image(10), PROMPTS[0]), (image(11, 64, 48), PROMPTS[1])]
    expected = [torch_pipe.generate(i, p, max_new_tokens=STEPS).token_ids for i, p in requests]
    # Interleaved by hand: two engines of one model, stepping in turn.
    engines = [onnx_pipe.engine_factory() for _ in requests]
    logits = [e.prefill(onnx_pipe.processor([i], [p]), STEPS) for e, (i, p) in zip(engines, requests)]
    tokens = [[int(lg.argmax())] for lg in logits]
    for _ in range(STEPS - 1):
        for index, engine in enumerate(engines):
            tokens[index].append(int(engine.decode_step(torch.tensor([tokens[index][-1]])).argmax()))
    assert all(e.fused for e in engines)
    assert not any(np.shares_memory(a, b) for a in engines[0].buffers + [engines[0].logits]
                   for b in engines[1].buffers + [engines[1].logits])
    for got, want in zip(tokens, expected):
        assert got[: len(want)] == want
    # And from two threads at once, through the pipeline.
    results = [None, None]

    def work(index):
        for _ in range(2):
            results[index] = onnx_pipe.generate(*requests[index], max_new_tokens=STEPS).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_a_pre_packed_session_reads_the_lookup_apart_and_the_output_projection_in_slices(pipes, monkeypatch):
    """Pre-packed, ONNX Runtime releases each stored weight once it has packed it, if nothing else reads it: the
    float lookup reads the tied matrix under a name of its own (so the output projection's stored copy goes), and a
    matrix over SLICE_BYTES is multiplied in slices of its rows, each an alias of a page-aligned row range of the
    same bytes, with the whole product's logits, bit for bit. Unpacked, the graph reads the matrix once, whole."""
    torch_pipe, onnx_pipe, _ = pipes
    model = onnx_pipe.engine_factory
    source = onnx.load(str(model.onnx_dir / "prefill.onnx"), load_external_data=False)
    (matrix,) = [i for i in source.graph.initializer if i.name.endswith("embed_tokens.weight")]
    record = {e.key: e.value for e in matrix.external_data}

    def readers(graph):
        return sorted((n.op_type, i) for n in graph.node for i in n.input if i.startswith(matrix.name))

    assert readers(fused_model(source, model.config).graph) == [("Gather", matrix.name), ("Gemm", matrix.name)]
    monkeypatch.setattr(fused, "SLICE_BYTES", 64 * 1024)
    graph = fused_model(source, model.config, packed=True).graph
    rows = {i.name: i for i in graph.initializer if i.name.startswith(matrix.name + ".rows_")}
    assert readers(graph) == [("Gather", matrix.name + LOOKUP_SUFFIX)] + [("Gemm", name) for name in sorted(rows)]
    # Rows of 256 bytes (64 floats) in slices of 64 KB: 256 rows each, the last the rest.
    assert sorted(a.dims[0] for a in rows.values())[1:] == [256] * (len(rows) - 1) and len(rows) >= 3
    start = int(record.get("offset", 0))
    for alias in sorted(rows.values(), key=lambda a: int(a.name.rsplit("_", 1)[-1])):
        alias_record = {e.key: e.value for e in alias.external_data}
        assert int(alias_record["offset"]) == start and (start - int(record.get("offset", 0))) % PAGE == 0
        start += int(alias_record["length"])
    assert start == int(record.get("offset", 0)) + int(record["length"])  # the matrix's bytes, each once

    inputs = torch_pipe.processor([image(1)], [PROMPTS[1]])
    sliced = OnnxModel(model.onnx_dir, model.config, batch_prepack=True)
    monkeypatch.setattr(fused, "SLICE_BYTES", 2**40)
    whole = OnnxModel(model.onnx_dir, model.config, batch_prepack=True)
    tokens_from = [torch.eye(16)[[5 + i]] for i in range(4)]  # "logits" whose argmax feeds tokens 5, 6, 7, 8
    reference = run_steps(whole(), inputs, tokens_from, steps=4)
    assert all(torch.equal(a, b) for a, b in zip(run_steps(sliced(), inputs, tokens_from, steps=4), reference))


def test_left_padded_tells_the_layouts_apart():
    assert left_padded(np.array([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert not left_padded(np.array([[1, 1, 0, 0]]))  # right padding
    assert not left_padded(np.array([[1, 0, 1, 1]]))  # a hole
    assert not left_padded(np.array([[0, 0, 0, 0]]))  # no real token


def test_fused_graphs_serve_float32_exports_on_the_cpu_provider_only(pipes):
    """Elsewhere the exported graphs serve: the CUDA provider (GroupQueryAttention there is float16 only) and
    float16 exports (int8 and int4 ones are fused too: tests/test_fused_quantized.py)."""
    config = pipes[0].config
    assert unsupported(config, "float32", "none", "cpu") is None and pipes[1].engine_factory.device_type == "cpu"
    assert "CUDA provider" in unsupported(config, "float32", "none", "cuda")
    assert "CUDA provider" in unsupported(config, "float32", "int4", "cuda")
    assert "float16" in unsupported(config, "float16", "none", "cpu")


def test_the_transformers_js_layout_keeps_to_standard_ops(tmp_path):
    """onnxruntime-web runs the transformers.js files as written: none of the fused graphs' contrib ops."""
    folder = tmp_path / "checkpoint"
    build_reference(folder, "pg2", text=dict(head_dim=32))
    export_transformers_js(folder, tmp_path / "tjs", progress=False, log=lambda *_: None)
    files = sorted((tmp_path / "tjs" / "onnx").glob("*.onnx"))
    assert len(files) >= 3
    for path in files:
        graph = onnx.load(str(path), load_external_data=False).graph
        assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, path.name
