"""float16 validation holds one ONNX Runtime session at a time (docs/export.md, "The full PaliGemma-3B shape"):
on CPU each float16 session keeps a float32 copy of its weights, so the three at once do not fit at 3B."""

import gc
import weakref

import onnxruntime as ort
import pytest
import torch
from tiny import build_reference

from export.runtime import export_and_validate, pipeline
from export.validation.torch_reference import torch_reference
from export.validation.validate import validate_export, validation_requests
from export.writer.onnx_export import export_model
from paligemma.checkpoint import Checkpoint
from paligemma.config import PaliGemmaConfig
from paligemma.processor import PaliGemmaProcessor


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pg2")
    build_reference(folder, "pg2")
    return folder


class CountedSession(ort.InferenceSession):
    """A real InferenceSession that notes which graphs were opened and how many sessions were alive at once."""

    alive: set = set()
    opened: list = []
    most_alive = 0

    def __init__(self, path, *args, **kwargs):
        super().__init__(path, *args, **kwargs)
        key = id(self)
        cls = CountedSession
        cls.alive.add(key)
        cls.opened.append(str(path).rsplit("/", 1)[-1])
        cls.most_alive = max(cls.most_alive, len(cls.alive))
        weakref.finalize(self, cls.alive.discard, key)


@pytest.fixture
def counted(monkeypatch):
    CountedSession.alive, CountedSession.opened, CountedSession.most_alive = set(), [], 0
    monkeypatch.setattr(pipeline.ort, "InferenceSession", CountedSession)
    return CountedSession


def test_float16_validation_opens_one_session_at_a_time(checkpoint, tmp_path, counted):
    lines = []
    manifest = export_and_validate(checkpoint, tmp_path / "fp16", dtype="float16", progress=False, log=lines.append)
    assert manifest["dtype"] == "float16"
    assert sum(line.startswith("validation ") for line in lines) == 3  # every graph was held to torch
    assert counted.opened == ["vision_encoder.onnx", "prefill.onnx", "decode.onnx"]  # each once, in order
    assert counted.most_alive == 1


def test_float32_validation_keeps_its_sessions_together(checkpoint, tmp_path, counted):
    # The counter sees sessions alive together: float32 shares one buffer of weights between them, unchanged.
    export_and_validate(checkpoint, tmp_path / "fp32", progress=False, log=quiet)
    assert counted.most_alive >= 3


def test_one_session_model_gives_the_shared_model_outputs(checkpoint, tmp_path):
    out = tmp_path / "fp16"
    export_model(checkpoint, out, dtype="float16", progress=False, log=quiet)
    config = PaliGemmaConfig.from_json_file(out / "config.json")
    reference = torch_reference(Checkpoint.resolve(checkpoint), "float16")
    alone = validate_export(reference, pipeline.OnnxModel(out, config, fused=False, one_session=True), log=quiet)
    shared = validate_export(reference, pipeline.OnnxModel(out, config, fused=False), log=quiet)
    assert alone == pytest.approx(shared, abs=1e-6)




def test_outputs_outlive_the_session_that_made_them(checkpoint, tmp_path):
    # Decode reads the cache that prefill returned after the prefill session is released: the outputs must own
    # their memory (a numpy-backed OrtValue's .numpy() read freed memory once the OrtValue was gone).
    out = tmp_path / "fp16"
    export_model(checkpoint, out, dtype="float16", progress=False, log=quiet)
    config = PaliGemmaConfig.from_json_file(out / "config.json")
    inputs = validation_requests(PaliGemmaProcessor.from_pretrained(checkpoint, config), config)[0]
    steps = {}
    for alone in (True, False):
        model = pipeline.OnnxModel(out, config, fused=False, one_session=alone)
        engine = model()
        logits = [engine.prefill(inputs, 3)]
        for _ in range(3):
            gc.collect()
            logits.append(engine.decode_step(logits[-1].argmax(-1)))
        steps[alone] = torch.stack(logits)
        if alone:
            assert list(model.sessions) == ["decode"]
    assert torch.equal(steps[True], steps[False])
