"""shapes.train, the demo model's recipe: its questions are the task's answers, its patch targets sit under the
shapes, its soft targets narrow on schedule, and the command runs, resumes and exports a loadable checkpoint."""

import json
import random

import numpy as np
import pytest
import torch

import paligemma
from paligemma.mask_decoder import paste_mask
from paligemma.train import IGNORE
from shapes import scenes as S
from shapes import train as R


@pytest.mark.parametrize("detections", [3, 4])
def test_every_question_is_answered_as_the_task_card_says(detections):
    asked = 0
    for index in range(300):
        scene = S.render_scene(0, index)
        truth = dict(S.task_pairs(scene))
        for prefix, suffix in R.questions(scene, random.Random(index), detections):
            assert truth[prefix] == suffix, (index, prefix)
            asked += 1
    assert asked == (3 + detections) * 300


@pytest.mark.parametrize("detections", [3, 4])
def test_questions_are_mostly_detections_of_kinds_present_and_seldom_repeated(detections):
    detections_asked = empty = repeated = color_zero = 0
    for index in range(1000):
        scene = S.render_scene(0, index)
        pairs = R.questions(scene, random.Random(index), detections)
        prefixes = [p for p, _ in pairs]
        repeated += len(set(prefixes)) < len(prefixes)
        detections_asked += sum(p.startswith("detect") for p in prefixes)
        empty += sum(s == "" for _, s in pairs)
        color_zero += sum(s == "0" for p, s in pairs if p.startswith("answer") and p != S.COUNT_PROMPT)
    assert repeated == 0
    assert detections_asked == detections * 1000
    assert 0 < empty / ((3 + detections) * 1000) < 0.03  # empty answers are taught, but rarely (see ABSENT_SHARE)
    assert 0.2 < color_zero / 1000 < 0.4  # a colour count answered "0" a third of the time, not most of it


def test_shape_weights_set_how_often_scenes_of_1_2_3_shapes_are_trained_on():
    assert [R.scene_index(0, slot, (1, 1, 1)) for slot in range(5)] == [0, 1, 2, 3, 4]  # uniform: the plain stream
    slots = range(3000)
    indexes = [R.scene_index(0, slot, (1, 2, 3)) for slot in slots]
    assert indexes == [R.scene_index(0, slot, (1, 2, 3)) for slot in slots]  # a pure function of the slot
    assert len(set(indexes)) == len(indexes) and min(indexes) >= 20_000_000  # no scene twice, none of stage 1's
    shares = [sum(S.shape_count(0, i) == n for i in indexes) / len(indexes) for n in (1, 2, 3)]
    assert shares == pytest.approx([1 / 6, 2 / 6, 3 / 6], abs=0.03)
    assert {len(S.render_scene(0, R.scene_index(0, slot, (0, 0, 1))).shapes) for slot in range(50)} == {3}


@pytest.mark.parametrize("option, message", [
    *[(["--shape-weights", text], "give three non-negative weights") for text in ["1,2", "1,-1,1", "0,0,0", "a,b,c"]],
    (["--detections", "0"], "ask at least one detection per image"),
    (["--decision-weight", "0"], "give a positive weight"),
    (["--polish-decision-weight", "-1"], "give a positive weight"),
    (["--polish-steps", "-1"], "give 0 (no stage 3) or more"),
    (["--settle-steps", "-1"], "give 0 (no stage 4) or more"),
    (["--polish-shape-weights", "1,2"], "give three non-negative weights"),
    (["--workers", "-1"], "give 0 (draw scenes between steps) or more"),
])
def test_bad_recipe_options_are_refused_with_a_message(option, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        R.main(["--out", str(tmp_path / "run"), *option])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_patch_targets_lie_under_the_shapes():
    scene = S.render_scene(0, 7)
    grid = 8
    classes, bins = R.patch_targets(scene, grid)
    kind = list(R.AUX_HEADS).index("kind")
    cell = S.CANVAS / grid
    for rank, shape in enumerate(scene.shapes):
        y, x = (shape.box[0] + shape.box[2]) / 2, (shape.box[1] + shape.box[3]) / 2
        patch = int(y // cell) * grid + int(x // cell)
        assert classes[kind, patch] == 1 + R.KINDS.index((shape.color, shape.shape))
        assert bins[:, patch].tolist() == [S.to_bin(c) for c in shape.box]
    background = (classes[kind] == 0).nonzero()[:, 0]
    assert len(background) > 0 and (bins[:, background] == IGNORE).all()


def test_patch_targets_give_each_shape_its_ranks_and_every_patch_the_counts():
    scene = next(s for s in (S.render_scene(0, i) for i in range(50))
                 if len(s.shapes) == 3 and len({x.shape for x in s.shapes}) == 2)
    grid, cell = 8, S.CANVAS / 8
    classes, _ = R.patch_targets(scene, grid)
    head = {name: i for i, name in enumerate(R.AUX_HEADS)}
    assert (classes[head["count"]] == 2).all()
    for color in S.COLORS:
        assert (classes[head[f"count_{color}"]] == sum(x.color == color for x in scene.shapes)).all()
    for kind in S.SHAPES:
        assert (classes[head[f"count_{kind}"]] == sum(x.shape == kind for x in scene.shapes)).all()
    for rank, shape in enumerate(scene.shapes):
        y, x = (shape.box[0] + shape.box[2]) / 2, (shape.box[1] + shape.box[3]) / 2
        patch = int(y // cell) * grid + int(x // cell)
        same_kind = [o for o in scene.shapes if o.shape == shape.shape]
        assert classes[head["rank"], patch] == rank
        assert classes[head["rank_in_kind"], patch] == same_kind.index(shape)
        for a, b in R.PAIRS:
            pair = [o for o in scene.shapes if o.shape in (a, b)]
            expected = pair.index(shape) if shape.shape in (a, b) else IGNORE
            assert classes[head[f"rank_in_{a}_{b}"], patch] == expected


def test_soft_targets_narrow_from_start_to_final():
    widths = [R.loc_sigma_at(step, 100, 2.0, 0.5) for step in range(101)]
    assert widths[0] == pytest.approx(2.0) and widths[-1] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(widths, widths[1:]))


def test_decision_weights_fall_on_each_boxs_first_location_token_and_the_token_after_its_label():
    from paligemma.config import PaliGemmaConfig
    from paligemma.processor import PaliGemmaProcessor
    from paligemma.train import loc_range_of, training_batch
    from shapes.tokenizer import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer()
    processor = PaliGemmaProcessor(tokenizer, PaliGemmaConfig.from_dict(R.model_config(tokenizer)))
    scene = next(s for s in S.render_scenes(2, 50) if len({x.shape for x in s.shapes}) == 1 and len(s.shapes) == 2)
    kind = scene.shapes[0].shape
    batch = training_batch(processor, [scene.image] * 2, [S.detect_prompt([kind]), S.CAPTION_PROMPT],
                           [S.detect_answer(scene, [kind]), S.caption(scene)])
    weights = R.decision_weights(batch["labels"], loc_range_of(tokenizer), 3.0)
    labels = batch["labels"][0]
    answer = [tokenizer.id_to_token(i) for i in labels[labels != IGNORE].tolist()]
    weighed = weights[0][labels != IGNORE].tolist()
    # <loc> x4, kind, " ;", " ", <loc> x4, kind, <eos>: the two first locations, the " ;" and the <eos>.
    assert [t for t, w in zip(answer, weighed) if w == 3.0] == [answer[0], answer[5], answer[7], answer[12]]
    assert answer[5] == "\u2581;" and answer[12] == "<eos>" and answer[7].startswith("<loc")
    assert sorted(set(weighed)) == [1.0, 3.0]
    assert (weights[1] == 1.0).all()  # a caption has no decisions
    assert (weights[0][labels == IGNORE] == 1.0).all()


def test_weighted_token_loss_is_the_weighted_mean():
    from paligemma.train import token_loss

    torch.manual_seed(0)
    logits, targets = torch.randn(5, 11), torch.randint(0, 11, (5,))
    each = torch.stack([token_loss(logits[i : i + 1], targets[i : i + 1]) for i in range(5)])
    weights = torch.tensor([1.0, 4.0, 1.0, 0.5, 2.0])
    torch.testing.assert_close(token_loss(logits, targets, weights=weights), (each * weights).sum() / weights.sum())
    torch.testing.assert_close(token_loss(logits, targets, weights=torch.ones(5)), token_loss(logits, targets))


def test_questions_refuse_fewer_than_one_detection():
    with pytest.raises(ValueError, match="at least one detection"):
        R.questions(S.render_scene(0, 0), random.Random(0), 0)


def test_unpacked_detections_ask_the_same_questions_in_rows_of_their_own():
    from paligemma.config import PaliGemmaConfig
    from paligemma.processor import PaliGemmaProcessor
    from shapes.tokenizer import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer()
    processor = PaliGemmaProcessor(tokenizer, PaliGemmaConfig.from_dict(R.model_config(tokenizer)))
    make = lambda unpack: R.synthetic_batches(processor, 8, 0, lambda step: 1.0, 10, 3, 2,  # noqa: E731
                                              R.Drawing(unpack_detections=unpack))
    packed, mixed = make(False)(4), make(True)(4)
    assert packed["input_ids"].shape[0] == 3 and mixed["input_ids"].shape[0] == 3 * (1 + 3)
    assert torch.equal(mixed["pixel_values"], packed["pixel_values"])  # one per image, the same images
    assert torch.equal(mixed["aux_classes"], packed["aux_classes"])
    assert mixed["row_image"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    for row, sees in enumerate(mixed["image_sees_prompt"].tolist()):
        prompt = tokenizer.decode(mixed["input_ids"][row][mixed["token_type_ids"][row] == 0].tolist())
        assert ("detect" in prompt) == sees and ("caption" in prompt) != sees
    # Each image is asked the same questions, split across its rows.
    def answers(batch, image):
        rows = (batch["row_image"] == image).nonzero()[:, 0].tolist()
        return sorted(tuple(batch["labels"][r][(batch["segments"][r] == k) & (batch["labels"][r] != IGNORE)].tolist())
                      for r in rows for k in set(batch["segments"][r].tolist()) - {-1, 0})

    for image in range(3):
        assert len(answers(mixed, image)) == 6 and answers(mixed, image) == answers(packed, image)


def test_recipe_command_trains_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    small = ["--out", str(run), "--vision-images", "2", "--images-per-step", "2", "--unpacked-images-per-step", "1",
             "--packed-steps", "1", "--eval-every", "0", "--save-every", "1", "--no-progress", "--threads", "1",
             "--vision-steps", "2", "--vqvae-steps", "2"]
    R.main(small + ["--steps", "2", "--polish-steps", "0"])  # a packed step, then an unpacked one
    first = paligemma.load(str(run / "last")).model.state_dict()
    R.main(small + ["--steps", "3", "--polish-steps", "0"])  # the same run, one more stage 2 step
    log = (run / "log.txt").read_text()
    assert "resumed from" in log and "at step 2" in log
    assert log.count("stage 1 (vision tower") == 1  # stage 1 was not run again
    R.main(["--out", str(run), "--export", str(tmp_path / "exported")])
    exported = paligemma.load(str(tmp_path / "exported")).model.state_dict()
    assert set(exported) == set(first)
    assert any(not torch.equal(exported[k], first[k]) for k in first)  # the third step changed the weights


def tiny_run(run, *stages) -> list[str]:
    """The recipe command on a tiny budget, every step saved; `stages` add each stage's step counts."""
    return ["--out", str(run), "--vision-images", "2", "--images-per-step", "2", "--unpacked-images-per-step", "1",
            "--packed-steps", "1", "--eval-every", "0", "--save-every", "1", "--no-progress", "--threads", "1",
            "--vision-steps", "1", "--vqvae-steps", "2", *stages]


def weights(folder) -> dict:
    return paligemma.load(str(folder)).model.state_dict()


def assert_one_small_step_from(after: dict, before: dict):
    assert any(not torch.equal(after[k], before[k]) for k in before)  # it trained from these weights
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-3  # one small warm-up step


def assert_exported_model_is(run, tmp_path, final_dir, earlier: dict):
    """--export copies `final_dir`'s model, which the resumed step moved away from `earlier`."""
    R.main(["--out", str(run), "--export", str(tmp_path / "exported")])
    exported, final = weights(tmp_path / "exported"), weights(final_dir)
    assert all(torch.equal(exported[k], final[k]) for k in final)  # the export is the last stage's model
    assert any(not torch.equal(final[k], earlier[k]) for k in final)  # the resumed step trained


def test_recipe_command_polishes_in_a_third_stage_that_resumes(tmp_path):
    run = tmp_path / "run"
    small = tiny_run(run, "--steps", "2")
    R.main(small + ["--polish-steps", "1"])
    stage_2, polished = weights(run / "last"), weights(run / "polish" / "last")
    assert_one_small_step_from(polished, stage_2)  # stage 3 trained from stage 2's weights
    R.main(small + ["--polish-steps", "2"])  # resumes stage 3 alone
    log = (run / "log.txt").read_text()
    assert log.count("stage 2 (whole model") == 1 and log.count("stage 3 (polish") == 2
    assert f"resumed from {run / 'polish' / 'last'} at step 1" in log
    assert torch.equal(weights(run / "last")[next(iter(stage_2))],
                       stage_2[next(iter(stage_2))])  # stage 2's checkpoint is left as it was
    assert_exported_model_is(run, tmp_path, run / "polish" / "last", polished)


def test_recipe_command_settles_in_a_fourth_stage_that_resumes(tmp_path):
    run = tmp_path / "run"
    small = tiny_run(run, "--steps", "1", "--polish-steps", "1")
    R.main(small + ["--settle-steps", "1"])
    polished, settled = weights(run / "polish" / "last"), weights(run / "settle" / "last")
    assert_one_small_step_from(settled, polished)  # stage 4 trained from stage 3's weights
    R.main(small + ["--settle-steps", "2"])  # resumes stage 4 alone
    log = (run / "log.txt").read_text()
    assert log.count("stage 2 (whole model") == 1 and log.count("stage 3 (polish") == 1
    assert log.count("stage 4 (settle") == 2
    assert f"resumed from {run / 'settle' / 'last'} at step 1" in log
    assert_exported_model_is(run, tmp_path, run / "settle" / "last", settled)


def test_recipe_fine_tunes_a_checkpoint_without_stage_1(tmp_path):
    run = tmp_path / "tuned"
    R.main(["--out", str(run), "--init-from", str(paligemma.DEMO_CHECKPOINT), "--steps", "1", "--images-per-step",
            "2", "--eval-every", "0", "--no-progress", "--threads", "1", "--aux-weight", "0", "--unpack-detections",
            "--polish-steps", "0", "--vqvae-steps", "2"])
    log = (run / "log.txt").read_text()
    assert "stage 1" not in log and f"from {paligemma.DEMO_CHECKPOINT}" in log
    tuned = paligemma.load(str(run / "last")).model.state_dict()
    shipped = paligemma.load().model.state_dict()
    kept = {k: tuned[k][: len(v)] for k, v in shipped.items()}  # the embedding has the appended rows too
    assert any(not torch.equal(kept[k], shipped[k]) for k in shipped)
    # One warm-up step moves each weight by about the learning rate: the run started from the shipped weights.
    assert max((kept[k] - shipped[k]).abs().max().item() for k in shipped) < 1e-3


def test_fine_tuning_refuses_a_model_of_another_shape(tmp_path):
    from paligemma.config import PaliGemmaConfig
    from paligemma.model import PaliGemmaForConditionalGeneration
    from paligemma.weights import save_checkpoint
    from shapes.tokenizer import build_shapes_tokenizer

    config = R.model_config(build_shapes_tokenizer())
    config["text_config"]["num_hidden_layers"] = 2
    save_checkpoint(PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(config)), tmp_path / "other")
    with pytest.raises(SystemExit, match="not a model of this recipe"):
        R.main(["--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "other"), "--steps", "1",
                "--no-progress"])


# ---- segmentation, absent shapes, the vocabulary extension, robustness --------------------------------------


def tiny_vqvae():
    from paligemma.mask_decoder import MaskDecoderConfig
    from shapes.vqvae import ShapesVQVAE

    torch.manual_seed(0)
    return ShapesVQVAE(MaskDecoderConfig(embedding_dim=8, width=16)).eval()


def test_each_image_is_asked_one_segmentation_answered_with_its_shapes_codes():
    from shapes.vqvae import scene_codes

    vqvae = tiny_vqvae()
    segmentations = 0
    for index in range(60):
        scene = S.render_scene(0, index)
        codes = scene_codes(scene, vqvae)
        pairs = R.questions(scene, random.Random(index), 3, codes)
        asked = [(p, a) for p, a in pairs if p.startswith("segment ")]
        assert len(pairs) == 7 and len(asked) == 1 and pairs[:6] == R.questions(scene, random.Random(index), 3)
        (prefix, answer), = asked
        names = prefix[len("segment "):].split(" ; ")
        found = paligemma.parse_segmentations(answer, S.CANVAS, S.CANVAS, vqvae)
        wanted = [(i, x) for i, x in enumerate(scene.shapes) if x.shape in names]
        assert [f.label for f in found] == [x.shape for _, x in wanted]
        for f, (i, x) in zip(found, wanted):  # its box and the mask its codes decode to
            assert np.allclose(f.box, (x.box[1], x.box[0], x.box[3], x.box[2]), atol=S.CANVAS / 1023)
            logits = vqvae.mask_logits(np.array([codes[i]]))[0]
            assert np.array_equal(f.mask, paste_mask(logits, f.box, S.CANVAS, S.CANVAS))
        segmentations += 1
    assert segmentations == 60


def test_absent_kinds_are_asked_in_the_share_given_and_answered_empty():
    from shapes.vqvae import scene_codes

    vqvae = tiny_vqvae()
    absent = {"detect": 0, "segment": 0}
    with_absent = 0
    for index in range(600):
        scene = S.render_scene(0, index)
        missing = S.absent_kinds(scene)
        with_absent += bool(missing)
        for prefix, answer in R.questions(scene, random.Random(index), 3, scene_codes(scene, vqvae), 0.5):
            task, _, names = prefix.partition(" ")
            if task in absent and set(names.split(" ; ")) <= set(missing):
                assert answer == "", prefix
                absent[task] += 1
    # The last detection and the segmentation each name an absent kind in half the scenes that have one.
    for task, count in absent.items():
        assert count / with_absent == pytest.approx(0.5, abs=0.07), task
    assert all(R.questions(S.render_scene(0, i), random.Random(i), 3, None, 0.0) ==
               R.questions(S.render_scene(0, i), random.Random(i), 3, None, 0.0) for i in range(5))


def test_decision_weights_fall_on_a_segmentation_answers_decisions_too():
    from paligemma.config import PaliGemmaConfig
    from paligemma.processor import PaliGemmaProcessor
    from paligemma.train import loc_range_of, training_batch
    from shapes.tokenizer import build_shapes_tokenizer
    from shapes.vqvae import scene_codes

    tokenizer = build_shapes_tokenizer()
    processor = PaliGemmaProcessor(tokenizer, PaliGemmaConfig.from_dict(R.model_config(tokenizer)))
    scene = next(s for s in S.render_scenes(2, 50) if len({x.shape for x in s.shapes}) == 1 and len(s.shapes) == 2)
    kind = scene.shapes[0].shape
    answer_text = S.segment_answer(scene, [kind], scene_codes(scene, tiny_vqvae()))
    batch = training_batch(processor, [scene.image], [S.segment_prompt([kind])], [answer_text])
    labels = batch["labels"][0]
    answer = [tokenizer.id_to_token(i) for i in labels[labels != IGNORE].tolist()]
    weighed = R.decision_weights(batch["labels"], loc_range_of(tokenizer), 3.0)[0][labels != IGNORE].tolist()
    # <loc> x4, <seg> x16, kind, " ;", " ", <loc> x4, <seg> x16, kind, <eos>
    assert len(answer) == 2 * 21 + 3 and answer[4].startswith("<seg") and answer[20] == "\u2581" + kind
    assert [i for i, w in enumerate(weighed) if w == 3.0] == [0, 21, 23, 44]
    assert answer[21] == "\u2581;" and answer[44] == "<eos>"


def previous_vocabulary_checkpoint(folder):
    """The shipped model as a checkpoint of the vocabulary before segmentation appended words (1,210 tokens: its
    embedding's first rows), which is what the checkpoint shipped before it looked like to the recipe."""
    from paligemma.config import PaliGemmaConfig
    from paligemma.model import PaliGemmaForConditionalGeneration
    from paligemma.weights import save_checkpoint
    from shapes.tokenizer import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer(appended=())
    shipped = paligemma.load().model.state_dict()
    shipped[R.EMBEDDING] = shipped[R.EMBEDDING][: tokenizer.get_vocab_size()]
    model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(R.model_config(tokenizer)))
    model.load_state_dict(shipped, strict=True)
    save_checkpoint(model, folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_the_vocabulary_is_extended_at_the_end_keeping_every_weight_of_the_model(tmp_path):
    from shapes.tokenizer import build_shapes_tokenizer

    previous = previous_vocabulary_checkpoint(tmp_path / "previous")
    run = tmp_path / "tuned"
    R.main(["--out", str(run), "--init-from", str(previous), "--steps", "1", "--lr", "0",
            "--images-per-step", "2", "--eval-every", "0", "--no-progress", "--threads", "1", "--polish-steps", "0",
            "--vqvae-steps", "2", "--save-every", "0"])
    assert "extended the vocabulary" in (run / "log.txt").read_text()
    shipped, tuned = paligemma.load(str(previous)), paligemma.load(str(run / "last"))
    old, new = shipped.model.state_dict(), tuned.model.state_dict()
    assert set(old) == set(new)
    size = shipped.model.config.text.vocab_size
    assert tuned.model.config.text.vocab_size == size + 2 == build_shapes_tokenizer().get_vocab_size()
    for key in old:  # learning rate 0: every weight as shipped, the embedding with two rows appended
        assert torch.equal(new[key][:size] if key == R.EMBEDDING else new[key], old[key]), key
    old_vocab = shipped.processor.tokenizer.get_vocab()
    assert all(tuned.processor.tokenizer.token_to_id(t) == i for t, i in old_vocab.items())
    # So the shipped model's answers are token for token the same until it is trained.
    scene = S.render_scene(1, 4)
    prompts = [S.CAPTION_PROMPT, S.detect_prompt([scene.shapes[0].shape])]
    assert [r.text for r in tuned.generate([scene.image] * 2, prompts, max_new_tokens=20)] == \
        [r.text for r in shipped.generate([scene.image] * 2, prompts, max_new_tokens=20)]
    assert tuned.mask_decoder is not None  # the run's VQ-VAE decoder ships beside it


def test_fine_tuning_refuses_a_vocabulary_whose_ids_moved(tmp_path):
    import shutil

    from tokenizers import Tokenizer

    moved = tmp_path / "moved"
    shutil.copytree(paligemma.DEMO_CHECKPOINT, moved)
    tokenizer = json.loads((moved / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]
    (moved / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert Tokenizer.from_file(str(moved / "tokenizer.json")).token_to_id("red") != 0
    with pytest.raises(SystemExit, match="not the start of the recipe's.*red"):
        R.main(["--out", str(tmp_path / "run"), "--init-from", str(moved), "--steps", "1", "--no-progress",
                "--vqvae-steps", "1", "--images-per-step", "1"])


@pytest.mark.parametrize("option, message", [
    (["--jpeg-fraction", "1.5"], "give a share from 0 to 1"),
    (["--absent-share", "-0.1"], "give a share from 0 to 1"),
    (["--vqvae-steps", "0"], "give 1 or more (or --no-segment)"),
    (["--contrastive-steps", "-1"], "give 0 (no contrastive stage) or more"),
    (["--contrastive-steps", "2", "--init-from", "x"], "cannot be combined with --init-from"),
    (["--contrastive-steps", "2", "--vision-init", "x"], "cannot be combined with --vision-init"),
])
def test_bad_segmentation_and_robustness_options_are_refused_with_a_message(option, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        R.main(["--out", str(tmp_path / "run"), *option])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_augmented_training_batches_keep_each_scenes_answers():
    from paligemma.config import PaliGemmaConfig
    from paligemma.processor import PaliGemmaProcessor
    from shapes.tokenizer import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer()
    processor = PaliGemmaProcessor(tokenizer, PaliGemmaConfig.from_dict(R.model_config(tokenizer)))
    make = lambda augment: R.synthetic_batches(processor, 8, 0, lambda step: 1.0, 10, 3, 2,  # noqa: E731
                                               R.Drawing(augment=augment, jpeg_fraction=0.0), tiny_vqvae())
    plain, augmented = make(False)(4), make(True)(4)
    for key in ("input_ids", "labels", "aux_classes", "aux_bins"):  # the same questions, answers and patch targets
        assert torch.equal(plain[key], augmented[key]), key
    assert not torch.equal(plain["pixel_values"], augmented["pixel_values"])  # drawn otherwise


def test_the_whole_recipe_runs_every_stage_tiny_and_resumes(tmp_path):
    run = tmp_path / "run"
    small = ["--out", str(run), "--vqvae-steps", "2", "--contrastive-steps", "2", "--contrastive-batch", "3",
             "--vision-images", "2", "--vision-steps", "2", "--images-per-step", "2", "--unpacked-images-per-step",
             "1", "--packed-steps", "1", "--eval-every", "0", "--save-every", "1", "--no-progress", "--threads", "1"]
    R.main(small + ["--steps", "2", "--polish-steps", "1"])
    log = (run / "log.txt").read_text()
    for stage in ("VQ-VAE of the masks", "contrastive stage:", f"stage 1 starts from the vision tower of {run}",
                  "stage 1 (vision", "stage 2 (whole", "stage 3 (polish"):
        assert log.count(stage) == 1, stage
    contrastive = paligemma.load_siglip(run / "contrastive" / "last").vision_model.state_dict()
    R.main(small + ["--steps", "2", "--polish-steps", "2"])  # rerun: only stage 3's new step
    log = (run / "log.txt").read_text()
    assert log.count("VQ-VAE of the masks") == 1 and log.count("contrastive stage:") == 1
    assert log.count("stage 1 (vision") == 1 and log.count("stage 2 (whole") == 1
    assert f"resumed from {run / 'polish' / 'last'} at step 1" in log
    exported = tmp_path / "exported"
    R.main(["--out", str(run), "--export", str(exported)])
    pipe = paligemma.load(str(exported))
    assert pipe.mask_decoder is not None and pipe.processor.tokenizer.token_to_id("segment") is not None
    decoder = paligemma.MaskDecoder.from_file(run / "vqvae" / "mask_decoder.safetensors")
    codes = np.arange(16)[None] * 7
    np.testing.assert_array_equal(pipe.mask_decoder.mask_logits(codes), decoder.mask_logits(codes))
    assert set(contrastive) >= {k for k in pipe.model.vision_tower.vision_model.state_dict()}
