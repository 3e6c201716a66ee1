"""`python -m paligemma batch`: a folder, a glob or a JSONL answered into one JSON line per input through the continuous
batch, each answer the one `pipe.generate` gives alone; failures as lines of their own; a run killed with SIGKILL and
resumed ends with the lines of an uninterrupted run; bad input refused in one line before the model loads.

The embedded model on ONNX Runtime (the command's default backend), a handful of drawn scenes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from app_server import rle_decode

import paligemma
from paligemma.__main__ import main
from paligemma.batch_io import LINE_KEYS, AnswerFile, read_items
from paligemma.errors import InputError
from shapes.scenes import COLORS, render_scene

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW_TOKENS = 96  # the command's default


@pytest.fixture(scope="module")
def pipe():
    return paligemma.load(backend="onnx")


@pytest.fixture(autouse=True)
def torch_threads():
    """The command sets torch's threads for its process; give this test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def draw(folder: Path, indices, suffix=".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in indices:
        path = folder / f"scene-{i:03d}{suffix}"
        render_scene(1, i).image.save(path, quality=95) if suffix == ".jpg" else render_scene(1, i).image.save(path)
        paths.append(path)
    return paths


def run(*args) -> int:
    return main(["batch", *map(str, args)])


def lines_of(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def without_timings(records) -> set[str]:
    return {json.dumps({k: v for k, v in r.items() if k != "timings"}, sort_keys=True) for r in records}


def expected(pipe, path, prompt) -> paligemma.GenerationResult:
    return pipe.generate(str(path), prompt, max_new_tokens=MAX_NEW_TOKENS)


def test_a_folder_answers_each_image_as_generate_does_and_its_failures_as_lines(tmp_path, pipe):
    folder = tmp_path / "photos"
    good = draw(folder, range(3)) + draw(folder / "more", [3], ".jpg")
    (folder / "corrupt.png").write_bytes(good[0].read_bytes()[:300])  # a PNG cut short
    (folder / "notes.png").write_text("not an image at all\n")
    (folder / "readme.txt").write_text("not read: not an image extension\n")
    out = tmp_path / "answers.jsonl"

    assert run("--input", folder, "--out", out, "--max-batch", 3) == 0

    records = {r["id"]: r for r in lines_of(out)}
    assert set(records) == {"scene-000.png", "scene-001.png", "scene-002.png", "more/scene-003.jpg", "corrupt.png",
                            "notes.png"}
    assert all(list(r) == list(LINE_KEYS) for r in records.values())
    for path in good:
        record = records[path.relative_to(folder).as_posix()]
        alone = expected(pipe, path, "caption en")
        assert record["error"] is None and record["image"] == str(path) and record["prompt"] == "caption en"
        assert (record["text"], record["token_ids"]) == (alone.text, alone.token_ids)
        assert record["text"].startswith("a ") and record["boxes"] == []
        assert {"read_s", "ttft_s", "total_s", "decode_tokens_per_s"} <= set(record["timings"])
    corrupt, notes = records["corrupt.png"], records["notes.png"]
    assert "corrupt or truncated" in corrupt["error"] and corrupt["text"] is None and corrupt["token_ids"] is None
    assert "not an image" in notes["error"] and notes["text"] is None and notes["boxes"] is None


def box_iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_a_jsonl_with_its_own_prompts_ids_and_relative_paths(tmp_path, pipe):
    scenes = {i: render_scene(1, i) for i in range(12)}
    shaped = next(i for i, s in scenes.items() if len(s.shapes) == 1)  # one shape: its box and mask are the truth
    shape = scenes[shaped].shapes[0]
    paths = draw(tmp_path / "images", [0, 1, shaped])
    source = tmp_path / "records.jsonl"
    source.write_text("\n".join([
        json.dumps({"id": 7, "image": "images/" + paths[0].name, "prompt": "answer en how many shapes are there?"}),
        json.dumps({"id": "no prompt", "image": "images/" + paths[1].name}),
        "",  # blank lines are skipped
        json.dumps({"id": "detect", "image": "images/" + paths[2].name, "prompt": f"detect {shape.shape}"}),
        json.dumps({"id": "segment", "image": "images/" + paths[2].name, "prompt": f"segment {shape.shape}"}),
        json.dumps({"id": "gone", "image": "images/missing.png"}),  # a file that is not there: an error line
    ]) + "\n")
    out = tmp_path / "answers.jsonl"

    assert run("--input", source, "--out", out, "--prompt", "caption en") == 0

    records = {r["id"]: r for r in lines_of(out)}
    assert set(records) == {7, "no prompt", "detect", "segment", "gone"}  # an integer id stays an integer
    gone = records["gone"]
    assert "does not exist" in gone["error"] and gone["image"] == "images/missing.png" and gone["text"] is None
    for key, path, prompt in [(7, paths[0], "answer en how many shapes are there?"), ("no prompt", paths[1],
                              "caption en"), ("detect", paths[2], f"detect {shape.shape}"),
                              ("segment", paths[2], f"segment {shape.shape}")]:
        alone = expected(pipe, path, prompt)
        assert records[key]["prompt"] == prompt and records[key]["token_ids"] == alone.token_ids
    assert records[7]["text"] == str(len(scenes[0].shapes))
    y0, x0, y1, x1 = shape.box  # the scene's truth, in pixels
    (detected,) = records["detect"]["boxes"]
    assert detected["label"] == shape.shape and "mask" not in detected
    assert box_iou(detected["box"], (x0, y0, x1, y1)) > 0.8
    (segmented,) = records["segment"]["boxes"]
    mask = rle_decode(segmented["mask"])
    painted = np.all(np.asarray(scenes[shaped].image) == COLORS[shape.color], axis=-1)
    assert mask.shape == painted.shape == (224, 224)
    assert (mask & painted).sum() / (mask | painted).sum() > 0.8


def count_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_a_run_killed_with_sigkill_and_resumed_ends_with_the_lines_of_one_uninterrupted_run(tmp_path):
    folder = tmp_path / "scenes"
    draw(folder, range(40))
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    assert run("--input", folder, "--out", whole) == 0

    command = [sys.executable, "-m", "paligemma", "batch", "--input", str(folder), "--out", str(resumed),
               "--max-batch", "2", "--readers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while count_lines(resumed) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = count_lines(resumed)
    assert 5 <= killed < 40
    with open(resumed, "ab") as file:  # as if killed in the middle of a line
        file.write(b'{"id": "scene-039.png", "image": "sc')

    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    assert "cut off a partial last line" in result.stderr
    assert f"skipped {killed} already answered" in result.stderr
    records = lines_of(resumed)
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    assert without_timings(records) == without_timings(lines_of(whole))


def test_the_answers_file_cuts_a_partial_line_keeps_whole_ones_and_refuses_a_foreign_one(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": 2, "text": "y"}\n{"id": "c", "te')
    with AnswerFile(out) as answers:
        assert answers.answered == {"a", 2} and answers.cut_bytes == len('{"id": "c", "te')
        answers.write('{"id": "c", "text": "z"}')
    assert out.read_text() == '{"id": "a", "text": "x"}\n{"id": 2, "text": "y"}\n{"id": "c", "text": "z"}\n'

    out.write_text('{"id": "a"}\nsomething else\n{"id": "b"}\n')
    with pytest.raises(InputError, match="line 2 is not an answer line"):
        AnswerFile(out)


def test_one_run_at_a_time_writes_an_answers_file(tmp_path):
    with AnswerFile(tmp_path / "answers.jsonl"):
        with pytest.raises(InputError, match="being written by another run"):
            AnswerFile(tmp_path / "answers.jsonl")


def test_a_glob_names_each_input_by_its_path_below_the_pattern(tmp_path):
    draw(tmp_path / "a", [0])
    draw(tmp_path / "a" / "b", [1], ".jpg")
    items = read_items(str(tmp_path / "a" / "**" / "*.*"))
    assert [item.id for item in items] == ["b/scene-001.jpg", "scene-000.png"]
    assert all(Path(item.path).is_file() for item in items)


def error_of(capsys, *args) -> str:
    assert run(*args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    return err


def test_bad_input_is_refused_in_one_line_before_the_model_loads(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    out = tmp_path / "answers.jsonl"
    assert "holds no image files" in error_of(capsys, "--input", empty, "--out", out)
    assert "does not exist" in error_of(capsys, "--input", tmp_path / "missing", "--out", out)
    assert "matches no file" in error_of(capsys, "--input", tmp_path / "*.png", "--out", out)
    draw(tmp_path / "images", [0])
    message = error_of(capsys, "--input", tmp_path / "images", "--out", tmp_path / "nowhere" / "answers.jsonl")
    assert "the folder" in message and "nowhere" in message and "does not exist" in message

    records = tmp_path / "records.jsonl"
    records.write_text('{"id": 1, "image": "images/scene-000.png"}\n{"id": 2, "image": "x.png",}\n')
    assert "line 2 is not JSON" in error_of(capsys, "--input", records, "--out", out)
    records.write_text('{"id": "a", "image": "x.png"}\n\n{"id": "b", "image": "y.png"}\n'
                       '{"id": "a", "image": "z.png"}\n')
    assert "line 4 has the id 'a' of line 1" in error_of(capsys, "--input", records, "--out", out)
    records.write_text('{"id": "a", "picture": "x.png"}\n')
    assert 'line 1 has no "image"' in error_of(capsys, "--input", records, "--out", out)
    assert "add --ray" in error_of(capsys, "--input", records, "--out", out, "--workers", 2)
    assert not out.exists()  # nothing was started


def test_allow_prefills_lets_that_many_requests_prefill_at_once(tmp_path):
    """Two requests submitted as the command does (submit_many, each its own group) meet inside the engine's
    prefill (a barrier both must reach) once two are allowed; with the default one, the second waits for the first,
    and the barrier times out."""
    import threading

    from paligemma.sampling import SamplingParams
    from paligemma.scheduler import Request

    pipe = paligemma.load(backend="onnx", max_batch=2)
    batcher, prefill = pipe.batcher, pipe.batcher.engine.prefill
    inputs = pipe.processor([str(draw(tmp_path, [0])[0])], ["caption en"])
    params = SamplingParams(4)

    def met(allowed: int) -> bool:
        barrier = threading.Barrier(2, timeout=1.0)
        met = []

        def meeting_prefill(*args):
            try:
                barrier.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)
            return prefill(*args)

        batcher.engine.prefill = meeting_prefill
        if allowed > 1:
            batcher.allow_prefills(allowed)
        requests = [Request(inputs, params, pipe.stop_ids, None) for _ in range(2)]
        threads = [threading.Thread(target=batcher.submit_many, args=([r],)) for r in requests]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for request in requests:
            list(request.stream())
        return all(met)

    assert not met(1)
    assert met(2)
    with pytest.raises(ValueError, match="prefills=0"):
        batcher.allow_prefills(0)


def test_images_prefilled_together_get_the_bits_each_gets_alone(tmp_path, pipe):
    """The batch prefills the images waiting for it together (the vision tower and the prompt of rows of one prompt
    length in one call): each row's cache and first logits are bit for bit those of its prefill alone, so that its
    answer is pipe.generate's."""
    engine = pipe.batcher.engine
    paths = draw(tmp_path, range(4))
    prompts = ["caption en", "detect circle", "caption en", "caption en"]
    inputs = [pipe.processor([str(path)], [prompt]) for path, prompt in zip(paths, prompts)]
    together = engine.prefill_many(inputs, [MAX_NEW_TOKENS, MAX_NEW_TOKENS, 5, MAX_NEW_TOKENS])
    for row, budget, (prefilled, logits) in zip(inputs, [MAX_NEW_TOKENS, MAX_NEW_TOKENS, 5, MAX_NEW_TOKENS],
                                                together):
        alone, alone_logits = engine.prefill(row, budget)
        assert torch.equal(logits, alone_logits)
        assert torch.equal(prefilled.keys, alone.keys) and torch.equal(prefilled.values, alone.values)
        assert torch.equal(prefilled.token_types, alone.token_types) and prefilled.capacity == alone.capacity


def test_a_group_whose_prefill_fails_fails_each_of_its_requests_and_the_batch_goes_on(tmp_path, pipe):
    from paligemma.sampling import SamplingParams
    from paligemma.scheduler import Request

    batcher, params = pipe.batcher, SamplingParams(MAX_NEW_TOKENS)
    paths = draw(tmp_path, range(3))
    inputs = [pipe.processor([str(path)], ["caption en"]) for path in paths]

    def broken(*args):
        raise RuntimeError("the engine broke")

    batcher.engine.prefill_many = broken
    try:
        requests = [Request(x, params, pipe.stop_ids, None) for x in inputs[:2]]
        errors = batcher.submit_many(requests)
    finally:
        del batcher.engine.prefill_many
    assert [str(e) for e in errors] == ["the engine broke"] * 2
    assert batcher.scheduler.taken == 0  # their rows given back
    requests = [Request(x, params, pipe.stop_ids, None) for x in inputs]
    assert batcher.submit_many(requests) == [None] * 3
    for request, path in zip(requests, paths):
        list(request.stream())
        assert pipe._finish(request.tokens, pipe.stop_ids) == expected(pipe, path, "caption en").token_ids
