"""Strict loading: each broken checkpoint raises with a message that names the problem."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import paligemma
from paligemma import CheckpointError


@pytest.fixture
def checkpoint(reference_factory, tmp_path):
    folder, _ = reference_factory("pg1")
    copy = tmp_path / "checkpoint"
    shutil.copytree(folder, copy)
    return copy


def edit_weights(folder, change):
    state = load_file(str(folder / "model.safetensors"))
    change(state)
    save_file(state, str(folder / "model.safetensors"))


def shard(folder):
    """Split model.safetensors into two shards with an index, as large checkpoints come."""
    state = load_file(str(folder / "model.safetensors"))
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_loads_like_a_single_file(checkpoint, reference_factory, images):
    folder, _ = reference_factory("pg1")
    expected = paligemma.load(folder).generate(images[0], "caption en", max_new_tokens=8)
    shard(checkpoint)
    assert (paligemma.load(checkpoint).generate(images[0], "caption en", max_new_tokens=8).token_ids
            == expected.token_ids)


def test_missing_shard(checkpoint):
    shard(checkpoint)
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002-of-00002.safetensors"):
        paligemma.load(checkpoint)


def test_unexpected_key(checkpoint):
    edit_weights(checkpoint, lambda s: s.__setitem__("language_model.model.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError,
                       match=r"unexpected tensors in model.safetensors: language_model.model.extra.weight"):
        paligemma.load(checkpoint)


def test_missing_key(checkpoint):
    edit_weights(checkpoint, lambda s: s.pop("language_model.model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: language_model.model.norm.weight"):
        paligemma.load(checkpoint)


def test_wrong_shape(checkpoint):
    key = "multi_modal_projector.linear.bias"
    edit_weights(checkpoint, lambda s: s.__setitem__(key, torch.zeros(5)))
    with pytest.raises(CheckpointError, match=rf"{key} in model.safetensors has shape \(5,\), expected \(64,\)"):
        paligemma.load(checkpoint)


def test_only_pickle_weights_are_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model.bin\).*never loaded"):
        paligemma.load(checkpoint)


def test_truncated_safetensors_header(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        paligemma.load(checkpoint)


def test_unknown_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "llava"
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'llava' is not supported"):
        paligemma.load(checkpoint)


def test_missing_required_config_field(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["text_config"]["num_hidden_layers"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text_config is missing the required field 'num_hidden_layers'"):
        paligemma.load(checkpoint)


def test_untied_lm_head_is_refused(checkpoint):
    edit_weights(checkpoint, lambda s: s.__setitem__("lm_head.weight",
                                                     torch.randn_like(s["language_model.model.embed_tokens.weight"])))
    with pytest.raises(CheckpointError, match="lm_head.weight differs from the token embedding"):
        paligemma.load(checkpoint)


def test_missing_tokenizer(checkpoint):
    (checkpoint / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        paligemma.load(checkpoint)


def test_hub_repo_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        paligemma.load("google/paligemma-3b-mix-224")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_and_stays_close(reference_factory, images, dtype):
    folder, _ = reference_factory("pg2")
    full = paligemma.load(folder)
    half = paligemma.load(folder, dtype=dtype)
    assert next(half.model.parameters()).dtype == dtype
    inputs = full.processor(images[:1], ["caption en"])
    with torch.no_grad():
        expected = full.model(**inputs)
        got = half.model(**inputs).float()
    # Loose on purpose: this checks that half precision runs and is the same model, not float32 parity.
    assert (got - expected).abs().max().item() < 0.1 * expected.abs().max().item()


def test_saved_checkpoint_round_trips_through_transformers(reference_factory, tmp_path, images):
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma.weights import save_checkpoint

    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder)
    save_checkpoint(pipe.model, tmp_path / "saved")
    shutil.copy(folder / "tokenizer.json", tmp_path / "saved")
    theirs = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "saved").eval()
    again = paligemma.load(tmp_path / "saved")
    inputs = pipe.processor(images[:1], ["caption en"])
    with torch.no_grad():
        expected = pipe.model(**inputs)
        assert torch.equal(again.model(**inputs), expected)
        assert (theirs(**inputs).logits - expected).abs().max().item() <= 1e-4


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


BAD_CONFIGS = {
    # name: (change to config.json, what the message must say)
    "ten million layers": (lambda c: c["text_config"].update(num_hidden_layers=10**7),
                           r"text_config\.num_hidden_layers=10000000 is out of range: allowed 1 to 512"),
    "text_config a string": (lambda c: c.update(text_config="gemma"),
                             r"text_config must be a JSON object, got 'gemma'"),
    "no attention heads": (lambda c: c["text_config"].update(num_attention_heads=0),
                           r"num_attention_heads=0 is out of range"),
    "width as a string": (lambda c: c["text_config"].update(hidden_size="64"),
                          r"hidden_size must be a whole number, got '64'"),
    "vision heads a float": (lambda c: c["vision_config"].update(num_attention_heads=2.5),
                             r"must be a whole number, got 2\.5"),
    "kv heads not dividing": (lambda c: c["text_config"].update(num_attention_heads=4, num_key_value_heads=3),
                              "not a multiple of num_key_value_heads"),
    "huge image": (lambda c: c["vision_config"].update(image_size=10**6), r"image_size=1000000 is out of range"),
    "patches past the limit": (lambda c: c["vision_config"].update(image_size=8192, patch_size=1),
                               "image tokens; allowed"),
    "eps negative": (lambda c: c["text_config"].update(rms_norm_eps=-1), "rms_norm_eps=-1 must be positive"),
    "nan theta": (lambda c: c["text_config"].update(rope_parameters={"rope_theta": "NaN"}),
                  "rope_theta must be a finite number"),
    "rope parameters a list": (lambda c: c["text_config"].update(rope_parameters=[1]),
                               "rope_parameters must be a JSON object"),
    "eos outside the vocabulary": (lambda c: c["text_config"].update(eos_token_id=10**9),
                                   "eos_token_id=1000000000 is out of range"),
    "bos a string": (lambda c: c.update(bos_token_id="2"), "bos_token_id must be a whole number"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_config_with_a_bad_field_is_refused_up_front(checkpoint, name):
    change, message = BAD_CONFIGS[name]
    edit_config(checkpoint, change)
    with pytest.raises(CheckpointError, match=message):
        paligemma.load(checkpoint)


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "must hold a JSON object, got a list"),
    ("{\"model_type\": \"paligemm\u00e9\"}".encode("latin-1"), "is not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
    (b"{" + b" " * (2 << 20) + b"}", "a config.json is a few kilobytes"),
])
def test_a_config_file_that_is_not_a_json_object_is_refused(checkpoint, content, message):
    (checkpoint / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        paligemma.load(checkpoint)


def test_a_config_that_is_a_folder_is_refused(checkpoint):
    (checkpoint / "config.json").unlink()
    (checkpoint / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        paligemma.load(checkpoint)


@pytest.mark.parametrize("weight_map,message", [
    (["model.safetensors"], "weight_map must map each tensor name to a shard file name"),
    ({"a": 3}, "weight_map must map each tensor name to a shard file name"),
    ({"a": "../other/model.safetensors"}, r"names the shard '\.\./other/model\.safetensors'; shards must be"),
    ({"a": "/etc/passwd"}, "names the shard '/etc/passwd'"),
    ({"a": "sub/model.safetensors"}, "named without a path"),
    ({"a": "model.bin"}, r"shards must be \*\.safetensors files"),
])
def test_a_shard_index_may_name_only_files_in_the_checkpoint_folder(checkpoint, tmp_path, weight_map, message):
    other = tmp_path / "other"  # a complete checkpoint next door: what "../other/..." would load
    shutil.copytree(checkpoint, other)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        paligemma.load(checkpoint)


def test_a_shard_index_that_is_not_json_is_refused(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match="is not a valid safetensors index"):
        paligemma.load(checkpoint)
