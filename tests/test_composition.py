"""Every path composes embed -> masks -> decoder through one helper, `run_decoder`, whose masks come from the rule
in paligemma.masks: the torch model, the exported graphs, the static engine's decode step and packed training rows.
ONNX Runtime's loop feeds its decode graph the rule's mask and positions."""

import ast
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import paligemma
from export.graphs import graph_modules
from export.runtime.pipeline import OnnxEngine
from export.writer.onnx_export import example_inputs
from paligemma.config import PaliGemmaConfig
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor
from shapes import scenes as S
from shapes import train as R
from shapes.packing import packed_batch, packed_hidden
from shapes.tokenizer import build_shapes_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("paligemma", "export", "demo", "bench", "shapes")


class Composed(Exception):
    pass


def forbid_composer(monkeypatch):
    """From here on, composing raises Composed: a path that does not raise composes by itself."""

    def run_decoder(*args, **kwargs):
        raise Composed

    monkeypatch.setattr(PaliGemmaForConditionalGeneration, "run_decoder", run_decoder)


def test_model_forward_goes_through_the_composer(reference_factory, images, monkeypatch):
    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder)
    inputs = pipe.processor(images[:1], ["caption en"])
    forbid_composer(monkeypatch)
    with pytest.raises(Composed):
        pipe.model(**inputs)
    with pytest.raises(Composed):
        pipe.model.hidden_states(inputs["input_ids"], inputs["pixel_values"])


def test_export_graphs_go_through_the_composer(reference_factory, monkeypatch):
    folder, _ = reference_factory("pg2")
    model = paligemma.load(folder).model
    forbid_composer(monkeypatch)
    modules, inputs = graph_modules(model), example_inputs(model.config, torch.float32)
    for name in ("prefill", "decode"):  # what tracing runs
        with pytest.raises(Composed):
            modules[name](*inputs[name])


def test_static_engine_decode_step_goes_through_the_composer(reference_factory, images, monkeypatch):
    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder, engine="static")
    engine = pipe.engine_factory()
    logits = engine.prefill(pipe.processor(images[:1], ["caption en"]), 4)
    forbid_composer(monkeypatch)
    with pytest.raises(Composed):
        engine.decode_step(logits.argmax(-1))


def test_packing_goes_through_the_composer(monkeypatch):
    tokenizer = build_shapes_tokenizer()
    config = PaliGemmaConfig.from_dict(R.model_config(tokenizer))
    model = PaliGemmaForConditionalGeneration(config).eval()
    scene = S.render_scene(3, 0)
    batch = packed_batch(PaliGemmaProcessor(tokenizer, config), [scene.image], [R.questions(scene, random.Random(0))])
    forbid_composer(monkeypatch)
    with pytest.raises(Composed), torch.no_grad():
        packed_hidden(model, batch, model.embed_image(batch["pixel_values"]))


def calls(names: set[str]) -> list[str]:
    """Where the project's code calls `.decoder(...)` or `finfo(...)` (a mask built by hand), file:line."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
                    if name in names:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_decoder_is_called_in_one_place_and_masks_made_in_one_module():
    # the mask decoder and the shapes' VQ-VAE have a `decoder` of their own (big_vision's name): not the language one
    vq_vae = ("paligemma/mask_decoder.py:", "shapes/vqvae.py:")
    (decoder_call,) = [call for call in calls({"decoder"}) if not call.startswith(vq_vae)]
    assert decoder_call.startswith("paligemma/model.py:")  # run_decoder
    assert {call.split(":")[0] for call in calls({"finfo"})} == {"paligemma/masks.py"}


class RecordingSessions:
    """Stands in for export.runtime.pipeline.OnnxModel: records the decode graph's feeds."""

    float_type = np.float32
    past_names = ["past_key_values.0.key"]
    fused = None  # the graphs as exported: those this test reads the feeds of

    def __init__(self):
        self.feeds = []

    def run(self, name, feeds):
        self.feeds.append((name, feeds))
        logits = torch.zeros(2, 5)
        outputs = {"vision_encoder": [torch.zeros(1)], "prefill": [logits, "cache"], "decode": [logits, "cache"]}
        return outputs[name]


def test_onnx_runtime_loop_feeds_the_rules_mask_and_positions():
    """A padded batch of two (prompts of 2 and 3 real tokens), two decode steps: the mask grows by real tokens and
    the positions count the real tokens, from 1."""
    sessions = RecordingSessions()
    engine = OnnxEngine(sessions)
    inputs = dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                  token_type_ids=torch.zeros(2, 3, dtype=torch.long), pixel_values=torch.zeros(2, 3, 4, 4))
    engine.prefill(inputs, 2)
    engine.decode_step(torch.tensor([7, 8]))
    engine.decode_step(torch.tensor([9, 10]))
    (_, first), (_, second) = [f for f in sessions.feeds if f[0] == "decode"]
    assert first["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    assert first["position_ids"].tolist() == [[3], [4]]
    assert second["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert second["position_ids"].tolist() == [[4], [5]]
    assert second["input_ids"].tolist() == [[9], [10]] and second["attention_mask"].dtype == np.int64
