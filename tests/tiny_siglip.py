"""Tiny random SigLIP checkpoints built with transformers' SiglipModel (the reference), with a tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = ["a red circle", "a blue square", "two green triangles", "a photo of a cat", "a photo of a dog",
          "one small yellow star and a big purple circle", "the quick brown fox jumps over the lazy dog"]
TEXT_LENGTH = 16


def build_siglip_tokenizer(path: Path) -> int:
    """A small word-piece-free BPE tokenizer laid out like SigLIP's: <pad> 0, </s> 1, <unk> 2, lower case, with
    `</s>` appended by its post-processor. Returns the vocabulary size."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer.save(str(path))
    return tokenizer.get_vocab_size()


def tiny_siglip_config(vocab: int, **overrides):
    from transformers import SiglipConfig

    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=TEXT_LENGTH, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    text.update(overrides.pop("text", {}))
    vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14)
    vision.update(overrides.pop("vision", {}))
    return SiglipConfig(text_config=text, vision_config=vision, **overrides)


def build_siglip_reference(folder: Path, seed: int = 0, std: float = 0.2, **overrides):
    """Save a random transformers SiglipModel with a tokenizer.json into `folder`; return the model (eval, fp32)."""
    from transformers import SiglipModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_siglip_tokenizer(folder / "tokenizer.json")
    torch.manual_seed(seed)
    model = SiglipModel(tiny_siglip_config(vocab, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(2.0)
            elif name == "logit_bias":
                p.fill_(-1.5)
            else:
                p.normal_(0.0, std)
    model.save_pretrained(folder)
    return model
