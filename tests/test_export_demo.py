"""The embedded demo checkpoint through ONNX Runtime: the same answers as torch on held-out scenes, hence the same
accuracy; int8 loses at most 2 points on any metric."""

import json
import subprocess
import sys

import pytest

import paligemma
from export.runtime import export_and_validate
from shapes import scenes as S
from shapes.evaluate import TARGETS, evaluate, max_new_tokens

NUM_SCENES = 24  # seed 1: held out (training uses seed 0)


def run(pipe, scenes):
    """The shapes metrics and every generated answer, in order."""
    answers = []

    def generate(images, prompts):
        texts = [r.text for r in pipe.generate(images, prompts, max_new_tokens=max_new_tokens())]
        answers.extend(texts)
        return texts

    return evaluate(generate, scenes), answers


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    scenes = S.render_scenes(1, NUM_SCENES)
    out = {"torch": run(paligemma.load(), scenes)}
    for quantize in (None, "int8"):
        onnx_dir = tmp_path_factory.mktemp(f"demo_{quantize or 'float32'}")
        export_and_validate(paligemma.DEMO_CHECKPOINT, onnx_dir, quantize=quantize, progress=False, log=lambda *_: None)
        out[quantize or "float32"] = run(paligemma.load(backend="onnx", onnx_dir=onnx_dir), scenes)
        out[f"{quantize or 'float32'}_dir"] = onnx_dir
    return out


def test_onnx_gives_torchs_answers_and_accuracy(results):
    (torch_metrics, torch_answers), (onnx_metrics, onnx_answers) = results["torch"], results["float32"]
    assert onnx_answers == torch_answers
    assert onnx_metrics == torch_metrics


@pytest.mark.parametrize("metric", list(TARGETS))
def test_int8_loses_at_most_two_points(results, metric):
    assert results["int8"][0][metric] >= results["torch"][0][metric] - 0.02, (results["int8"][0], results["torch"][0])


def test_evaluation_command_runs_the_onnx_export(results):
    command = [sys.executable, "-m", "shapes.evaluate", "--num-scenes", str(NUM_SCENES), "--seed", "1", "--json",
               "--backend", "onnx", "--onnx-dir", str(results["float32_dir"])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["backend"] == "onnx"
    assert {k: metrics[k] for k in TARGETS} == {k: results["torch"][0][k] for k in TARGETS}
