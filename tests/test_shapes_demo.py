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
from shapes.evaluate import ISSUE_19_CONDITIONS, ISSUE_19_TARGETS, TARGETS

CHECKPOINT = Path(paligemma.__file__).parent / "demo_checkpoint"


def test_checkpoint_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (CHECKPOINT / name).is_file(), name
    assert (CHECKPOINT / "mask_decoder.safetensors").is_file()  # it segments (issue 19)
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
    command = [sys.executable, "-m", "shapes.evaluate", "--num-scenes", "200", "--seed", "1", "--json", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def issue_19_suite():
    """Issue 19's four conditions (exact and shifted colours, each plain and through JPEG q75) on 200 held-out
    scenes, through the command a user runs."""
    return run_evaluation("--suite", "issue19")


# 200 scenes: at 60, one scene moves a metric by 1.7 points, too coarse for the 2-point JPEG check.
@pytest.mark.parametrize("condition", [name for name, *_ in ISSUE_19_CONDITIONS])
@pytest.mark.parametrize("metric", list(ISSUE_19_TARGETS))
def test_held_out_scenes_meet_issue_19s_targets(issue_19_suite, condition, metric):
    metrics = issue_19_suite["conditions"][condition]
    assert metrics[metric] >= ISSUE_19_TARGETS[metric], (condition, metrics)


def test_the_task_cards_targets_hold_too(issue_19_suite):
    exact = issue_19_suite["conditions"]["exact"]
    assert all(exact[metric] >= target for metric, target in TARGETS.items()), exact


def test_jpeg_quality_75_costs_at_most_2_points(issue_19_suite):
    assert not [m for m in issue_19_suite["missed"] if "jpeg75 costs" in m], issue_19_suite["missed"]
