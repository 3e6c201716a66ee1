"""The shipped demo checkpoint: small, a plain PaliGemma checkpoint, and above the task card's targets on held-out
scenes, measured through the same command a user runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paligemma
from shapes import scenes as S
from shapes.evaluate import ROBUSTNESS_CONDITIONS, ROBUSTNESS_TARGETS, TARGETS

CHECKPOINT = Path(paligemma.__file__).parent / "demo_checkpoint"


def test_checkpoint_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (CHECKPOINT / name).is_file(), name
    assert (CHECKPOINT / "mask_decoder.safetensors").is_file()  # it segments
    assert sum(p.stat().st_size for p in CHECKPOINT.iterdir()) <= 25 * 1024 * 1024  # weights and decoder


def test_load_without_a_path_gives_the_demo_model():
    pipe = paligemma.load()
    assert pipe.model.config.image_size == 112
    scenes = S.render_scenes(1, 12)
    results = pipe.generate([s.image for s in scenes], [S.COUNT_PROMPT] * len(scenes), max_new_tokens=4)
    right = sum(r.text == S.count_answer(s) for r, s in zip(results, scenes))
    assert right >= 10, [r.text for r in results]


def test_transformers_reads_the_checkpoint_and_agrees():
    from transformers import PaliGemmaForConditionalGeneration as Reference

    pipe = paligemma.load()
    reference = Reference.from_pretrained(CHECKPOINT).eval()
    scene = S.render_scene(1, 3)
    inputs = pipe.processor([scene.image], [S.CAPTION_PROMPT])
    with torch.no_grad():
        ours = pipe.model(**inputs)
        theirs = reference(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def run_evaluation(*extra):
    command = [sys.executable, "-m", "shapes.evaluate", "--seed", "1", "--json", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def robustness_suite():
    """The robustness suite (exact and shifted colours, each plain and through JPEG q75) on 48 held-out scenes,
    through the command a user runs, on ONNX Runtime (whose tokens equal torch's: test_export_demo.py). The figures
    the targets were set on come from 500 scenes (`--num-scenes 500`, docs/embedded-model.md); at 48 the result is
    the same fixed sample every run, so the JPEG check is coarser (one scene moves a metric by about 2 points) but
    deterministic."""
    return run_evaluation("--num-scenes", "48", "--suite", "robustness", "--backend", "onnx")


@pytest.mark.parametrize("condition", [name for name, *_ in ROBUSTNESS_CONDITIONS])
@pytest.mark.parametrize("metric", list(ROBUSTNESS_TARGETS))
def test_held_out_scenes_meet_the_robustness_targets(robustness_suite, condition, metric):
    metrics = robustness_suite["conditions"][condition]
    assert metrics[metric] >= ROBUSTNESS_TARGETS[metric], (condition, metrics)


def test_the_task_cards_targets_hold_too(robustness_suite):
    exact = robustness_suite["conditions"]["exact"]
    assert all(exact[metric] >= target for metric, target in TARGETS.items()), exact


def test_jpeg_quality_75_costs_at_most_2_points(robustness_suite):
    assert not [m for m in robustness_suite["missed"] if "jpeg75 costs" in m], robustness_suite["missed"]
