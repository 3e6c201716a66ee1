"""shapes/contrastive.py: the contrastive stage, its retrieval protocol, and the hand-over to shapes/train.py."""

import json

import pytest
import torch

import paligemma
from paligemma.siglip_model import SiglipModel
from shapes import contrastive as C
from shapes import scenes as S
from shapes import train as R
from shapes.tokenizer import build_shapes_tokenizer


def test_retrieval_ranks_its_own_caption_among_19_others_with_as_many_shapes():
    scenes = S.render_scenes(1, 200)
    captions, counts = [S.caption(s) for s in scenes], [len(s.shapes) for s in scenes]
    rows = C.retrieval_candidates(captions, counts, seed=1)
    assert len(rows) == 200
    for i, row in enumerate(rows):
        assert len(row) == 20 and row[0] == i
        assert all(counts[j] == counts[i] and captions[j] != captions[i] for j in row[1:])
        if counts[i] > 1:  # 19 different captions exist for two or three shapes
            assert len({captions[j] for j in row}) == 20
    assert rows == C.retrieval_candidates(captions, counts, seed=1)  # a seeded draw


def test_captions_are_laid_out_as_siglip_texts():
    tokenizer = build_shapes_tokenizer()
    longest = "a yellow triangle, a yellow triangle and a yellow triangle"
    ids = C.caption_ids(tokenizer, ["a red circle", longest])
    assert ids.shape == (2, C.TEXT_LENGTH)
    row = ids[0].tolist()
    assert row[row.index(C.EOS_ID) + 1:] == [C.PAD_ID] * (C.TEXT_LENGTH - row.index(C.EOS_ID) - 1)
    assert C.EOS_ID in ids[1].tolist()  # the longest caption fits with its <eos>


def test_the_stage_trains_and_reports_retrieval(tmp_path, capsys):
    out = tmp_path / "contrastive"
    C.main(["--out", str(out), "--steps", "2", "--batch-size", "4", "--warmup", "1", "--eval-every", "0",
            "--eval-scenes", "60"])
    model = paligemma.load_siglip(out / "last")
    assert model.has_text_tower and model.logit_bias.item() != -10.0  # trained from the paper's initialisation
    assert "held-out retrieval" in (out / "log.txt").read_text()
    C.main(["--evaluate", str(out / "last"), "--eval-scenes", "60"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["retrieval_top1"] <= 1.0 and set(result) > {"top1_3_shapes"}


def test_shapes_train_starts_stage_1_from_the_contrastive_tower(tmp_path):
    tokenizer = build_shapes_tokenizer()
    siglip = SiglipModel(C.contrastive_config(tokenizer))
    C.initialize(siglip, seed=5)
    C.save_run_checkpoint(siglip, tokenizer, tmp_path / "tower")
    run = tmp_path / "run"
    R.main(["--out", str(run), "--vision-init", str(tmp_path / "tower"), "--vision-steps", "1", "--vision-lr", "0",
            "--vision-images", "2", "--images-per-step", "2", "--unpacked-images-per-step", "1", "--packed-steps", "1",
            "--steps", "1", "--polish-steps", "0", "--eval-every", "0", "--no-progress", "--threads", "1",
            "--vqvae-steps", "1"])
    stage_1 = paligemma.load(str(run / "vision" / "last")).model.vision_tower.vision_model.state_dict()
    tower = {k: v for k, v in siglip.vision_model.state_dict().items() if not k.startswith("head.")}
    assert set(stage_1) == set(tower)
    assert all(torch.equal(stage_1[k], tower[k]) for k in tower)  # at learning rate 0 stage 1 keeps it as handed over


def test_a_locked_tower_from_the_embedded_model_stays_as_loaded_while_the_text_tower_learns(tmp_path):
    """LiT: --vision-from copies a PaliGemma checkpoint's tower (its pooling head fresh); --lock-vision trains the
    text tower and the head alone, so the saved tower equals the checkpoint's, resumed runs included."""
    out = tmp_path / "lit"
    command = ["--out", str(out), "--batch-size", "4", "--warmup", "1", "--eval-every", "0", "--eval-scenes", "40",
               "--vision-from", str(paligemma.DEMO_CHECKPOINT), "--lock-vision", "--threads", "1"]
    C.main(command + ["--steps", "1"])
    first = paligemma.load_siglip(out / "last")
    C.main(command + ["--steps", "2"])  # resumes: the lock holds for the resumed step too
    trained = paligemma.load_siglip(out / "last")
    checkpoint = paligemma.load_siglip(paligemma.DEMO_CHECKPOINT).vision_model.state_dict()
    tower = trained.vision_model.state_dict()
    assert all(torch.equal(tower[k], checkpoint[k]) for k in checkpoint)
    assert any(not torch.equal(tower[k], first.vision_model.state_dict()[k]) for k in tower if k.startswith("head."))
    text, text_before = trained.text_model.state_dict(), first.text_model.state_dict()
    assert any(not torch.equal(text[k], text_before[k]) for k in text)


def test_lit_options_that_cannot_work_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        C.main(["--out", str(tmp_path / "x"), "--lock-vision"])
    assert exit_code.value.code == 2
    assert "give --vision-from CHECKPOINT too" in capsys.readouterr().err
    tokenizer = build_shapes_tokenizer()
    other = SiglipModel(C.contrastive_config(tokenizer, text_layers=1))
    narrow = SiglipModel(C.SiglipConfig.from_dict(dict(other.config.to_dict(), vision_config=dict(
        other.config.to_dict()["vision_config"], intermediate_size=64))))
    C.save_run_checkpoint(narrow, tokenizer, tmp_path / "narrow")
    model = SiglipModel(C.contrastive_config(tokenizer))
    with pytest.raises(ValueError, match="its vision tower is not the embedded model's .*mlp"):
        C.start_vision_from(model, str(tmp_path / "narrow"))


def test_the_checkpoints_tokenizer_gives_the_ids_the_text_tower_was_trained_on(tmp_path):
    """classify reads texts with the checkpoint's own tokenizer.json (paligemma.SiglipTokenizer): it must lay a
    caption out as caption_ids does in training, <eos> and padding included."""
    tokenizer = build_shapes_tokenizer()
    model = SiglipModel(C.contrastive_config(tokenizer, text_layers=1))
    C.save_run_checkpoint(model, tokenizer, tmp_path / "ckpt")
    captions = ["a red circle", "a green triangle, a red triangle and a green square",
                "a yellow triangle, a yellow triangle and a yellow triangle"]
    read = paligemma.SiglipTokenizer.from_pretrained(tmp_path / "ckpt", model.config.text)
    assert torch.equal(read(captions), C.caption_ids(tokenizer, captions))
