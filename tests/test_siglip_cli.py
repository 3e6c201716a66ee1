"""`python -m paligemma classify`: zero-shot scores as the library gives them, and clear one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import random_image
from tiny_siglip import build_siglip_reference

import paligemma
from paligemma.__main__ import main
from paligemma.processor import load_image, preprocess_image
from paligemma.zero_shot import classify

LABELS = ["a red circle", "a blue square", "two green triangles"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip_cli")
    return folder, build_siglip_reference(folder, seed=1)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.png"
    random_image(7).save(path)
    return path


def run(*args):
    return subprocess.run([sys.executable, "-m", "paligemma", *args], capture_output=True, text=True, timeout=300)


def test_classify_json_gives_the_reference_probabilities(checkpoint, image):
    folder, reference = checkpoint
    out = run("classify", "--model", str(folder), "--image", str(image), "--labels", ",".join(LABELS),
              "--template", "a photo of {}", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [s["label"] for s in result["scores"]] == LABELS
    # transformers' SiglipModel on the same ids and pixels: probabilities are the sigmoid of each logit.
    tokenizer = paligemma.SiglipTokenizer.from_pretrained(folder, paligemma.load_siglip(folder).config.text)
    input_ids = tokenizer([f"a photo of {label}" for label in LABELS])
    pixel_values = preprocess_image(load_image(image), 28)[None]
    with torch.no_grad():
        expected = torch.sigmoid(reference(input_ids=input_ids, pixel_values=pixel_values).logits_per_image[0])
    assert [s["probability"] for s in result["scores"]] == pytest.approx(expected.tolist(), abs=1e-5)


def test_a_label_is_scored_on_its_own(checkpoint, image):
    folder, _ = checkpoint
    model = paligemma.load_siglip(folder)
    tokenizer = paligemma.SiglipTokenizer.from_pretrained(folder, model.config.text)
    alone = classify(model, tokenizer, image, LABELS[:1])[0].probability
    among_others = classify(model, tokenizer, image, LABELS)[0].probability
    assert alone == pytest.approx(among_others, abs=1e-6)  # sigmoid, not softmax over the labels


@pytest.mark.parametrize("labels, message", [
    ("", "the label list is empty"),
    ("   ", "the label list is empty"),
    ("a red circle,a red circle", "duplicate label(s): 'a red circle'"),
    ("a red circle, a red circle ", "duplicate label(s): 'a red circle'"),
    ("a red circle,   ,a blue square", "label 2 is only spaces"),
    ("a red circle,,a blue square", "label 2 is empty"),
])
def test_bad_label_lists_are_one_line_usage_errors(checkpoint, image, labels, message, capsys):
    folder, _ = checkpoint
    with pytest.raises(SystemExit) as exit_:
        main(["classify", "--model", str(folder), "--image", str(image), "--labels", labels])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_a_label_file_holds_labels_with_commas(checkpoint, image, tmp_path, capsys):
    """Captions such as "a red circle, a blue square and a green triangle" hold commas: --labels-file reads one label
    per line and scores exactly what --labels would score for the same labels."""
    folder, _ = checkpoint
    labels = ["a red circle, a blue square and a green triangle", "a blue square"]
    (tmp_path / "labels.txt").write_text("\n".join(labels) + "\n\n")
    assert main(["classify", "--model", str(folder), "--image", str(image), "--labels-file",
                 str(tmp_path / "labels.txt"), "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)["scores"]
    assert [s["label"] for s in from_file] == labels
    assert main(["classify", "--model", str(folder), "--image", str(image), "--labels", labels[1], "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["scores"]
    assert alone[0]["logit"] == pytest.approx(from_file[1]["logit"], abs=1e-5)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the label file"),
    ("\n\n", "is empty; write one label per line"),
    ("a red circle\n\na blue square\n", "label 2 is empty"),
    ("a red circle\na red circle\n", "duplicate label(s): 'a red circle'"),
])
def test_bad_label_files_are_one_line_usage_errors(checkpoint, image, tmp_path, content, message, capsys):
    folder, _ = checkpoint
    path = tmp_path / "labels.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_:
        main(["classify", "--model", str(folder), "--image", str(image), "--labels-file", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0


def test_a_template_without_its_slot_is_a_usage_error(checkpoint, image, capsys):
    folder, _ = checkpoint
    with pytest.raises(SystemExit) as exit_:
        main(["classify", "--model", str(folder), "--image", str(image), "--labels", "a", "--template", "a photo"])
    assert exit_.value.code == 2 and "must hold '{}' exactly once" in capsys.readouterr().err


def test_a_paligemma_checkpoint_has_no_text_tower(image):
    out = run("classify", "--model", str(paligemma.DEMO_CHECKPOINT), "--image", str(image), "--labels", "a,b")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
    assert "PaliGemma checkpoint" in out.stderr and "no text tower" in out.stderr


def test_a_siglip_checkpoint_without_a_tokenizer_is_named(checkpoint, image, tmp_path, capsys):
    import shutil

    folder, _ = checkpoint
    copy = tmp_path / "no_tokenizer"
    shutil.copytree(folder, copy)
    (copy / "tokenizer.json").unlink()
    assert main(["classify", "--model", str(copy), "--image", str(image), "--labels", "a"]) == 1
    assert "neither tokenizer.json nor spiece.model" in capsys.readouterr().err
