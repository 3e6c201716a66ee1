"""The whole SigLIP model against transformers' SiglipModel on tiny random configs, the sigmoid loss, and loading."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_siglip import TEXT_LENGTH, build_siglip_reference

import paligemma
from paligemma.contrastive import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE
from paligemma.siglip_config import SiglipConfig
from paligemma.siglip_model import NoTextTowerError, SiglipModel

TEXTS = ["a red circle", "a blue square", "two green triangles", "a photo of a cat"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    return folder, build_siglip_reference(folder)


@pytest.fixture(scope="module")
def loaded(reference):
    folder, _ = reference
    model = paligemma.load_siglip(folder)
    return model, paligemma.SiglipTokenizer.from_pretrained(folder, model.config.text)


def reference_outputs(model, input_ids, pixel_values, return_loss=False):
    with torch.no_grad():
        return model(input_ids=input_ids, pixel_values=pixel_values, return_loss=return_loss)


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_embeddings_and_logits_match_transformers(reference, loaded):
    _, ref = reference
    model, tokenizer = loaded
    input_ids = tokenizer(TEXTS)
    pixel_values = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = reference_outputs(ref, input_ids, pixel_values)
    with torch.no_grad():
        assert max_diff(model.image_embeddings(pixel_values), expected.image_embeds) <= 1e-4
        assert max_diff(model.text_embeddings(input_ids), expected.text_embeds) <= 1e-4
        logits = model(input_ids=input_ids, pixel_values=pixel_values)
    assert logits.shape == (3, 4)
    assert max_diff(logits, expected.logits_per_image) <= 1e-4


def test_text_is_padded_to_the_model_length_and_ends_with_eos(loaded):
    _, tokenizer = loaded
    ids = tokenizer(["a red circle", "a red circle " * 40])
    assert ids.shape == (2, TEXT_LENGTH)
    short = ids[0].tolist()
    end = short.index(1)  # </s>
    assert end > 0 and set(short[end + 1:]) == {0}  # then <pad> to the end
    assert ids[1, -1].item() == 1  # a long text is cut, keeping its </s>


def test_loss_matches_transformers_and_its_gradient(reference, loaded):
    _, ref = reference
    model, tokenizer = loaded
    input_ids = tokenizer(TEXTS)
    pixel_values = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    expected = reference_outputs(ref, input_ids, pixel_values, return_loss=True)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values)
    assert abs(paligemma.sigmoid_loss(logits).item() - expected.loss.item()) <= 1e-5

    # The gradient with respect to the logits: transformers' own loss differentiated through its logits_per_text.
    out = ref(input_ids=input_ids, pixel_values=pixel_values, return_loss=True)
    (reference_grad,) = torch.autograd.grad(out.loss, out.logits_per_text)
    z = out.logits_per_image.detach().clone().requires_grad_(True)
    paligemma.sigmoid_loss(z).backward()
    assert max_diff(z.grad, reference_grad.T) <= 1e-6
    assert reference_grad.abs().max() > 1e-3  # a gradient worth comparing


def test_loss_by_hand_on_a_3x3_batch():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, -0.5, -4.0]])
    labels = [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]]
    by_hand = sum(math.log(1 + math.exp(-labels[i][j] * z[i, j].item())) for i in range(3) for j in range(3)) / 3
    assert paligemma.sigmoid_loss(z).item() == pytest.approx(by_hand, abs=1e-6)
    # Per pair: 0.1269 0.3133 0.9741 / 0.6931 0.0486 0.1269 / 1.3133 0.4741 4.0181; sum 8.0884, over 3 images:
    assert paligemma.sigmoid_loss(z).item() == pytest.approx(2.6961, abs=1e-4)


def test_large_logits_give_a_finite_loss_and_gradient():
    z = torch.tensor([[1e4, -1e4], [1e4, -1e4]], requires_grad=True)
    loss = paligemma.sigmoid_loss(z)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # Row 0 is right with great confidence (loss 0); row 1 is wrong twice (+1e4 on a negative, -1e4 on a positive).
    assert loss.item() == pytest.approx((1e4 + 1e4) / 2, rel=1e-6)
    assert z.grad.abs().max().item() == pytest.approx(0.5)


def test_loss_refuses_non_square_logits():
    with pytest.raises(ValueError, match="square"):
        paligemma.sigmoid_loss(torch.zeros(2, 3))


def test_chunked_loss_equals_the_full_one():
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(10, 8, generator=g), dim=-1)
    scale, bias = torch.tensor([math.log(10.0)]), torch.tensor([-10.0])
    full = paligemma.sigmoid_loss(images @ texts.T * scale.exp() + bias)
    sizes = [3, 3, 4]  # uneven devices
    chunked = paligemma.chunked_sigmoid_loss(list(images.split(sizes)), list(texts.split(sizes)), scale, bias)
    assert abs(chunked.item() - full.item()) <= 1e-5


def test_temperature_and_bias_start_as_the_paper_says(reference):
    folder, _ = reference
    model = SiglipModel(SiglipConfig.from_json_file(folder / "config.json"))
    assert model.logit_scale.item() == pytest.approx(math.log(10)) == INIT_LOGIT_SCALE
    assert model.logit_bias.item() == -10.0 == INIT_LOGIT_BIAS


def test_a_missing_text_tower_is_named(reference, tmp_path):
    folder, _ = reference
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("text_model.")}, tmp_path / "model.safetensors")
    with pytest.raises(paligemma.CheckpointError, match="text tower is missing"):
        paligemma.load_siglip(tmp_path)


def test_a_missing_or_misshaped_tensor_is_named(reference, tmp_path):
    folder, _ = reference
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    del state["vision_model.head.probe"]
    state["logit_bias"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(paligemma.CheckpointError, match=r"missing tensors: vision_model\.head\.probe.*logit_bias"):
        paligemma.load_siglip(tmp_path)


def test_an_unexpected_tensor_is_named(reference, tmp_path):
    folder, _ = reference
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    state["text_model.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(paligemma.CheckpointError, match=r"unexpected tensors.*text_model\.extra\.weight"):
        paligemma.load_siglip(tmp_path)


def test_a_siglip_config_without_a_text_config_is_refused(reference, tmp_path):
    folder, _ = reference
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["text_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(paligemma.CheckpointError, match="text_config"):
        paligemma.load_siglip(tmp_path)


def test_other_model_types_are_refused(reference, tmp_path):
    folder, _ = reference
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "clip"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(paligemma.CheckpointError, match="model_type 'clip' is not supported"):
        paligemma.load_siglip(tmp_path)


def test_a_paligemma_tower_loads_without_a_head(reference_factory):
    folder, ref = reference_factory("pg1")
    model = paligemma.load_siglip(folder)
    assert not model.has_text_tower and not hasattr(model.vision_model, "head")
    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref.model.vision_tower(pixel_values=pixel_values).last_hidden_state
        assert max_diff(model.patch_features(pixel_values), expected) <= 1e-4
        embeddings = model.image_embeddings(pixel_values)
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings, F.normalize(expected.mean(dim=1), dim=-1), atol=1e-5)
    with pytest.raises(NoTextTowerError, match="no text tower"):
        model.text_embeddings(torch.zeros(1, 4, dtype=torch.long))


def test_the_embedded_checkpoint_tower_loads():
    model = paligemma.load_siglip(paligemma.DEMO_CHECKPOINT)
    assert model.config.source == "paligemma" and not model.has_text_tower


def test_save_and_load_round_trip_is_exact(loaded, tmp_path):
    from paligemma.siglip_model import save_siglip

    model, tokenizer = loaded
    save_siglip(model, tmp_path)
    again = paligemma.load_siglip(tmp_path)
    ids = tokenizer(TEXTS)
    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, pixel_values=pixel_values),
                           again(input_ids=ids, pixel_values=pixel_values))


def test_bad_inputs_get_clear_errors(loaded):
    model, _ = loaded
    with pytest.raises(paligemma.InputError, match="at most 16 tokens"):
        model.text_embeddings(torch.zeros(1, TEXT_LENGTH + 1, dtype=torch.long))
    with pytest.raises(paligemma.InputError, match=r"pixel_values must be \[batch, 3, 28, 28\]"):
        model.image_embeddings(torch.zeros(1, 3, 32, 32))


def test_spiece_model_tokenizes_as_transformers_siglip_tokenizer(tmp_path):
    """Published SigLIP checkpoints ship spiece.model only: canonicalized, encoded, </s> appended, padded."""
    import io

    import sentencepiece
    from tiny_siglip import CORPUS
    from transformers import SiglipTokenizer as ReferenceTokenizer

    from paligemma.siglip_config import SiglipTextConfig

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([text.lower() for text in CORPUS] * 20), model_writer=model, vocab_size=40,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (tmp_path / "spiece.model").write_bytes(model.getvalue())
    texts = ["A Red circle!", "  two   green, triangles. ", "a photo of a cat " * 10, "Über naïve"]
    expected = ReferenceTokenizer(vocab_file=str(tmp_path / "spiece.model"))(
        texts, padding="max_length", max_length=16, truncation=True).input_ids
    config = SiglipTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                              vocab_size=40, max_position_embeddings=16, pad_token_id=1)  # pad = </s>, as published
    assert paligemma.SiglipTokenizer.from_pretrained(tmp_path, config)(texts).tolist() == expected


def test_a_published_style_config_takes_transformers_defaults():
    """google/siglip-base-patch16-224's config.json spells only what differs from transformers' defaults."""
    from transformers import SiglipConfig as ReferenceConfig

    published = {"model_type": "siglip", "text_config": {"model_type": "siglip_text_model"},
                 "vision_config": {"model_type": "siglip_vision_model", "patch_size": 16}}
    ours, reference = SiglipConfig.from_dict(published), ReferenceConfig(**{k: v for k, v in published.items()
                                                                             if k != "model_type"})
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                 "image_size", "layer_norm_eps", "hidden_act", "vision_use_head"):
        assert getattr(ours.vision, name) == getattr(reference.vision_config, name), name
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id"):
        assert getattr(ours.text, name) == getattr(reference.text_config, name), name
    assert ours.text.embedding_size == reference.text_config.projection_size
