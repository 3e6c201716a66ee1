"""The KV cache changes nothing: cached decoding equals a full forward pass; a batch equals one at a time."""

import torch

import paligemma
from paligemma.cache import KVCache
from paligemma.engines import TorchEngine


def cached_logits(pipe, inputs, continuation):
    engine = TorchEngine(pipe.model)
    steps = [engine.prefill(inputs, len(continuation))]
    for token in continuation[:-1]:
        steps.append(engine.decode_step(torch.tensor([token] * inputs["input_ids"].shape[0])))
    return torch.stack(steps, dim=1)  # [B, steps, V]


def full_logits(pipe, inputs, continuation):
    B = inputs["input_ids"].shape[0]
    extra = torch.tensor([continuation[:-1]] * B)
    ids = torch.cat([inputs["input_ids"], extra], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], 1)
    types = torch.cat([inputs["token_type_ids"], torch.ones_like(extra)], 1)
    with torch.no_grad():
        logits = pipe.model(ids, inputs["pixel_values"], mask, types)
    return logits[:, inputs["input_ids"].shape[1] - 1 :]


def test_cached_decoding_equals_full_forward(reference_factory, images):
    for variant in ("pg1", "pg2"):  # pg2's window (6) is shorter than prompt + continuation
        folder, _ = reference_factory(variant)
        pipe = paligemma.load(folder)
        inputs = pipe.processor(images[:2], ["caption en", "where is the fox going"])
        continuation = [5, 17, 260, 33, 41, 7, 99, 120, 64, 12]
        got = cached_logits(pipe, inputs, continuation)
        expected = full_logits(pipe, inputs, continuation)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5


def test_batch_equals_one_at_a_time(reference_factory, images):
    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder)
    prompts = ["caption en", "answer en what colour is the third square from the left", "detect dog"]
    batched = pipe.generate(images, prompts, max_new_tokens=16)
    for image, prompt, result in zip(images, prompts, batched):
        single = pipe.generate(image, prompt, max_new_tokens=16)
        assert single.token_ids == result.token_ids
        assert single.text == result.text


def test_cache_refuses_to_overflow(reference_factory):
    folder, _ = reference_factory("pg1")
    config = paligemma.PaliGemmaConfig.from_json_file(folder / "config.json")
    cache = KVCache(config.text, batch_size=1, capacity=4)
    keys = torch.zeros(1, config.text.num_key_value_heads, 5, config.text.head_dim)
    try:
        cache.update(0, keys, keys)
    except ValueError as e:
        assert "holds 4 tokens" in str(e)
    else:
        raise AssertionError("a cache overflow must raise")


def test_vision_tower_runs_once_per_request(reference_factory, images):
    folder, _ = reference_factory("pg1")
    pipe = paligemma.load(folder)
    calls = []
    handle = pipe.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        pipe.generate(images[:2], ["caption en", "detect dog"], max_new_tokens=12)
    finally:
        handle.remove()
    assert len(calls) == 2  # once per row (each is prefilled alone), never while decoding
