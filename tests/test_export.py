"""The ONNX export and the ONNX Runtime loop against torch and transformers, on tiny random PaliGemma 1 and 2
checkpoints exported here (PaliGemma 2's sliding window, 6, is shorter than every prompt)."""

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from tiny import build_reference, reference_processor

import paligemma
from export.graphs import GRAPH_ORDER
from export.runtime import export_and_validate
from export.writer.manifest import SHARED_DATA_NAME

PROMPTS = ["caption en", "answer en what is in the image and where is it"]
DECODE_STEPS = 24


def image(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def quiet(*_):
    pass


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def exported(request, tmp_path_factory):
    """(checkpoint folder, export folder, transformers model, torch pipeline, onnx pipeline)."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = build_reference(folder, request.param)
    onnx_dir = tmp_path_factory.mktemp(f"{request.param}_onnx")
    export_and_validate(folder, onnx_dir, progress=False, log=quiet)
    return (folder, onnx_dir, reference, paligemma.load(folder),
            paligemma.load(folder, backend="onnx", onnx_dir=onnx_dir))


def test_logits_match_torch_for_prefill_and_24_decode_steps(exported):
    _, _, _, torch_pipe, onnx_pipe = exported
    inputs = torch_pipe.processor([image(1)], [PROMPTS[1]])
    window = torch_pipe.config.text.sliding_window
    if window is not None:
        assert inputs["input_ids"].shape[1] > window + 10  # the window cuts into the prompt
    torch_engine, onnx_engine = torch_pipe.engine_factory(), onnx_pipe.engine_factory()
    expected, got = torch_engine.prefill(inputs, DECODE_STEPS), onnx_engine.prefill(inputs, DECODE_STEPS)
    assert got.shape == expected.shape == (1, torch_pipe.config.text.vocab_size)
    assert (got - expected).abs().max().item() <= 1e-4
    for _ in range(DECODE_STEPS):
        tokens = expected.argmax(-1)
        expected, got = torch_engine.decode_step(tokens), onnx_engine.decode_step(tokens)
        assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_match_torch_and_transformers(exported):
    folder, _, reference, torch_pipe, onnx_pipe = exported
    config = torch_pipe.config
    processor = reference_processor(folder, config.image_size, config.num_image_tokens)
    for seed, prompt in enumerate(PROMPTS):
        result = onnx_pipe.generate(image(seed), prompt, max_new_tokens=DECODE_STEPS)
        assert result.token_ids == torch_pipe.generate(image(seed), prompt, max_new_tokens=DECODE_STEPS).token_ids
        theirs = processor(images=[image(seed)], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = reference.generate(**theirs, max_new_tokens=DECODE_STEPS, do_sample=False, eos_token_id=[])
        expected = out[0, theirs["input_ids"].shape[1]:].tolist()
        # Random weights rarely emit <eos>; if they do, ours stops there and the reference goes on.
        assert len(result.token_ids) > 4
        assert result.token_ids == expected[: len(result.token_ids)]


def test_seeded_top_p_matches_torch(exported):
    _, _, _, torch_pipe, onnx_pipe = exported
    kwargs = dict(max_new_tokens=DECODE_STEPS, do_sample=True, temperature=1.5, top_p=0.9)
    outputs = []
    for seed in (7, 8):
        got = onnx_pipe.generate(image(3), PROMPTS[0], seed=seed, **kwargs)
        assert got.token_ids == torch_pipe.generate(image(3), PROMPTS[0], seed=seed, **kwargs).token_ids
        outputs.append(got.token_ids)
    assert outputs[0] != outputs[1]  # the seed matters, so equality above is not luck


def test_padded_batch_of_two_matches_torch(exported):
    _, _, _, torch_pipe, onnx_pipe = exported
    images = [image(4), image(5, 64, 48)]
    inputs = torch_pipe.processor(images, PROMPTS)
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"][1].sum()  # the first row is padded
    expected = torch_pipe.engine_factory().prefill(inputs, 4)
    got = onnx_pipe.engine_factory().prefill(inputs, 4)
    assert (got - expected).abs().max().item() <= 1e-4
    ours = onnx_pipe.generate(images, PROMPTS, max_new_tokens=DECODE_STEPS)
    theirs = torch_pipe.generate(images, PROMPTS, max_new_tokens=DECODE_STEPS)
    assert [r.token_ids for r in ours] == [r.token_ids for r in theirs]
    assert [r.text for r in ours] == [r.text for r in theirs]


def test_streaming_gives_the_generated_text(exported):
    _, _, _, _, onnx_pipe = exported
    updates = list(onnx_pipe.stream(image(6), PROMPTS[0], max_new_tokens=12))
    assert updates[-1].finished
    assert "".join(u.delta for u in updates) == updates[-1].text
    assert updates[-1].text == onnx_pipe.generate(image(6), PROMPTS[0], max_new_tokens=12).text


def test_cpu_provider_is_reported(exported):
    _, _, _, _, onnx_pipe = exported
    assert onnx_pipe.engine_factory.providers == ["CPUExecutionProvider"]


def test_weights_are_stored_once_with_metadata(exported):
    _, onnx_dir, _, torch_pipe, _ = exported
    graphs = {name: onnx.load(str(onnx_dir / f"{name}.onnx"), load_external_data=False) for name in GRAPH_ORDER}
    external = {}
    for name in ("prefill", "decode"):
        for tensor in graphs[name].graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                assert info["location"] == SHARED_DATA_NAME
                external.setdefault(name, {})[tensor.name] = (info["offset"], info["length"])
            else:
                assert len(tensor.raw_data) < 1024, f"{tensor.name} is stored inside {name}.onnx"
    # Every decode weight is one of prefill's, at the same place in the one data file.
    assert external["decode"].items() <= external["prefill"].items()
    embed = torch_pipe.config.text.vocab_size * torch_pipe.config.text.hidden_size * 4
    assert (onnx_dir / SHARED_DATA_NAME).stat().st_size < 2 * sum(int(n) for _, n in external["prefill"].values())
    assert sum(1 for _, n in external["prefill"].values() if int(n) == embed) == 1  # the tied embedding, once
    for name, graph in graphs.items():
        metadata = {p.key: p.value for p in graph.metadata_props}
        assert metadata["paligemma.graph"] == name
        assert metadata["paligemma.dtype"] == "float32"
        assert metadata["paligemma.exporter_version"]
        assert len(metadata["paligemma.config_hash"]) == 64
        assert graph.ir_version <= 10
