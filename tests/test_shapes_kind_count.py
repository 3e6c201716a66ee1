"""shapes.kind_count: the new question's examples and held-out records answer what the scenes show, in words the
shapes tokenizer has; the old tasks replayed beside them are drawn by their weights."""

import json
from collections import Counter

import pytest

from paligemma.train import read_jsonl
from shapes import kind_count as K
from shapes import scenes as S
from shapes.tokenizer import build_shapes_tokenizer


def test_examples_count_the_kind_asked_about_and_use_known_words(tmp_path):
    K.write_data(tmp_path, examples=6, held_out=2, replay=0.0)
    train, held_out = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "held_out.jsonl")
    assert len(train) == 6 and len(held_out) == 2 * len(S.SHAPES)
    for i, record in enumerate(train):
        kind = S.SHAPES[i % 3]
        assert record["prefix"] == f"answer en how many {kind} shapes are there?"
        assert record["suffix"] == str(sum(s.shape == kind for s in S.render_scene(0, i).shapes))
        assert "distill" not in record
    scene = S.render_scene(1, 1)
    assert [r["suffix"] for r in held_out[3:]] == [str(sum(s.shape == k for s in scene.shapes)) for k in S.SHAPES]
    tokenizer = build_shapes_tokenizer()
    unknown = tokenizer.token_to_id("<unk>")
    assert unknown not in tokenizer.encode(K.question("triangle")).ids
    assert json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])["image"].startswith("images/")


def test_replay_weights_choose_the_old_tasks_replayed(tmp_path):
    weights = K.parse_replay_weights("caption=0,count=0,color_count=0,detect=0,absent=0,absent_segment=0")
    assert weights["segment"] == K.REPLAY_WEIGHTS["segment"] and weights["caption"] == 0
    K.write_data(tmp_path, examples=4, held_out=1, replay=1.0, replay_weights=weights)
    train = read_jsonl(tmp_path / "train.jsonl")
    assert [r["prefix"].split()[0] for r in train] == ["segment"] * 4
    assert all("<seg" in r["suffix"] and r["distill"] for r in train)  # the embedded model's masks, as it answers


@pytest.mark.parametrize("text", ["colour=2", "caption=-1", "caption"])
def test_a_bad_replay_weight_is_one_line(text):
    with pytest.raises(ValueError, match=f"--replay-weights {text}: give TASK=WEIGHT"):
        K.parse_replay_weights(text)


def test_balance_asks_about_the_kind_whose_answer_has_been_given_least(tmp_path):
    K.write_data(tmp_path, examples=60, held_out=0, replay=0.0, balance=True)
    given = Counter()
    for i, record in enumerate(read_jsonl(tmp_path / "train.jsonl")):
        counts = {k: str(sum(s.shape == k for s in S.render_scene(0, i).shapes)) for k in S.SHAPES}
        kind = record["prefix"].removeprefix("answer en how many ").split()[0]
        assert record["suffix"] == counts[kind]
        assert given[counts[kind]] == min(given[c] for c in counts.values())
        given[record["suffix"]] += 1
    assert given["2"] >= 15  # about 1 in 8 in turn
