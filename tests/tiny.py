"""Tiny random PaliGemma checkpoints built with transformers (the reference) for parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors, trainers

# transformers' PaliGemmaProcessor over a tokenizer.json; the benchmark builds its reference the same way.
from bench.reference import transformers_processor as reference_processor  # noqa: F401

CORPUS = [
    "caption en", "answer en what is in the image?", "detect cat ; dog", "segment the red car",
    "a cat sitting on a bench", "two dogs play in the snow", "how many shapes are there?",
    "the quick brown fox jumps over the lazy dog", "a red circle and a blue square", "étoile café naïve 東京",
]
NUM_LOC, NUM_SEG = 1024, 128


def build_gemma_like_tokenizer(path: Path) -> dict:
    """A small BPE tokenizer laid out like Gemma's: <pad> 0, <eos> 1, <bos> 2, <unk> 3, spaces as "▁", byte
    fallback, a post-processor that adds <bos> (which PaliGemma's processor must not use), then the loc and
    seg tokens and <image> last. Returns the special ids."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", *bytes_],
                                  initial_alphabet=list("\n"), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B:1",
                                                             special_tokens=[("<bos>", 2)])
    tokenizer.add_tokens([AddedToken(f"<loc{i:04d}>", normalized=False) for i in range(NUM_LOC)])
    tokenizer.add_tokens([AddedToken(f"<seg{i:03d}>", normalized=False) for i in range(NUM_SEG)])
    tokenizer.add_special_tokens([AddedToken("<image>", normalized=False, special=True)])
    tokenizer.save(str(path))
    return dict(image=tokenizer.token_to_id("<image>"), vocab=tokenizer.get_vocab_size())


def tiny_config(kind: str, image_token: int, vocab: int, **overrides):
    """A transformers PaliGemmaConfig. kind: 'pg1' (Gemma) or 'pg2' (Gemma 2)."""
    from transformers import PaliGemmaConfig

    text = dict(model_type="gemma" if kind == "pg1" else "gemma2", hidden_size=64, num_hidden_layers=3,
                intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=24,  # head_dim != 64 / 4
                vocab_size=vocab, max_position_embeddings=512)
    if kind == "pg2":
        text.update(sliding_window=6, query_pre_attn_scalar=20, attn_logit_softcapping=5.0,
                    final_logit_softcapping=10.0)
    text.update(overrides.pop("text", {}))
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=28,
                  patch_size=14, vision_use_head=False)
    vision.update(overrides.pop("vision", {}))
    return PaliGemmaConfig(text_config=text, vision_config=vision, projection_dim=64, image_token_index=image_token,
                           vocab_size=vocab, **overrides)


def build_reference(folder: Path, kind: str = "pg1", seed: int = 0, std: float = 0.2, **overrides):
    """Save a random transformers PaliGemma (transformers 5 layout) with a tokenizer into `folder`; return it."""
    from transformers import PaliGemmaForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    ids = build_gemma_like_tokenizer(folder / "tokenizer.json")
    vocab = (ids["vocab"] + 63) // 64 * 64  # padded, as the real 257216-row embedding is
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(tiny_config(kind, ids["image"], vocab, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Larger than the default init so that every path moves the logits; a smaller embedding keeps the
            # tied output from echoing the last input token, so that greedy runs do not repeat one token.
            p.normal_(0.0, std / 4 if "embed_tokens" in name else std)
    model.save_pretrained(folder)
    return model


def rewrite_layout(folder: Path, layout: str) -> None:
    """Rename the saved keys into one of the layouts found in the wild: 'hub', 'tf4' or 'tf5' (as saved)."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    renamed = {}
    for key, value in state.items():
        if layout == "hub":
            key = (key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.")
                   else key)
        elif layout == "tf4":
            if key.startswith("vision_tower."):
                key = "model.vision_tower.vision_model." + key[len("vision_tower."):]
            elif key.startswith("multi_modal_projector."):
                key = "model." + key
            elif key.startswith("language_model.model."):
                key = "model.language_model." + key[len("language_model.model."):]
        renamed[key] = value
    if layout == "tf4":
        renamed["lm_head.weight"] = renamed["model.language_model.embed_tokens.weight"].clone()
    save_file(renamed, str(path), metadata={"format": "pt"})


def config_json(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())
