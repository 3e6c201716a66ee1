"""SigLIP's text input: each text becomes exactly `max_position_embeddings` ids (64 in the published checkpoints),
ending with the end-of-sequence token and padded after it, as SigLIP was trained (the text tower pools the last
position, so the padding is part of what it learned).

Two files are read, the first found:
- tokenizer.json (the `tokenizers` library): its own normalizer and post-processor apply, then truncation and
  padding to the model's length;
- spiece.model (the SentencePiece model google/siglip-* ship, no tokenizer.json): read with the `sentencepiece`
  package (pinned in requirements.txt). Texts are canonicalized first as big_vision and transformers'
  SiglipTokenizer do (lower case, punctuation removed, runs of white space made one space, stripped), then
  encoded, cut to leave room for `</s>`, `</s>` appended, padded with the config's pad id.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .checkpoint import resolve_checkpoint
from .errors import CheckpointError, ConfigError, InputError, shown
from .siglip_config import SiglipConfig, SiglipTextConfig

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "spiece.model"
EOS_PIECE = "</s>"
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str) -> str:
    """big_vision's prompt canonicalization, which SigLIP's SentencePiece tokenizer applies before encoding."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


class SiglipTokenizer:
    def __init__(self, encode, length: int, pad_id: int, source: Path):
        self._encode = encode  # text -> ids, already truncated and ending as the file wants
        self.length = length
        self.pad_id = pad_id
        self.source = source

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike,
                        config: SiglipTextConfig | None = None) -> "SiglipTokenizer":
        """The tokenizer of a SigLIP checkpoint folder or Hub id; `config` (its text config) is read from its
        config.json when not given."""
        folder = resolve_checkpoint(path_or_repo_id)
        if config is None:
            try:
                config = SiglipConfig.from_json_file(folder / "config.json").text
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
            if config is None:
                raise CheckpointError(f"{folder} is a PaliGemma checkpoint: "
                                      "it has no SigLIP text tower to tokenize for")
        length = config.max_position_embeddings
        if (folder / TOKENIZER_JSON).is_file():
            return cls._from_tokenizer_json(folder / TOKENIZER_JSON, config)
        if (folder / SENTENCEPIECE_MODEL).is_file():
            return cls._from_sentencepiece(folder / SENTENCEPIECE_MODEL, config)
        raise CheckpointError(f"{folder} has neither {TOKENIZER_JSON} nor {SENTENCEPIECE_MODEL}; copy the tokenizer "
                              f"from the checkpoint's repo (a SigLIP text tower reads {length}-token texts)")

    @classmethod
    def _from_tokenizer_json(cls, path: Path, config: SiglipTextConfig) -> "SiglipTokenizer":
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid tokenizer.json ({e})") from None
        tokenizer.no_padding()
        # Truncation leaves room for what the post-processor adds (the end-of-sequence token).
        tokenizer.enable_truncation(config.max_position_embeddings)
        return cls(lambda text: tokenizer.encode(text).ids, config.max_position_embeddings, config.pad_token_id, path)

    @classmethod
    def _from_sentencepiece(cls, path: Path, config: SiglipTextConfig) -> "SiglipTokenizer":
        try:
            import sentencepiece
        except ImportError:
            raise CheckpointError(f"{path.parent} has only {SENTENCEPIECE_MODEL}, which needs the sentencepiece "
                                  "package: pip install -r requirements.txt") from None
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable SentencePiece model ({e})") from None
        eos = processor.PieceToId(EOS_PIECE)
        if processor.IdToPiece(eos) != EOS_PIECE:
            raise CheckpointError(f"{path} has no {EOS_PIECE} piece; it is not a SigLIP tokenizer")
        room = config.max_position_embeddings - 1

        def encode(text: str) -> list[int]:
            return processor.EncodeAsIds(canonicalize(text))[:room] + [eos]

        return cls(encode, config.max_position_embeddings, config.pad_token_id, path)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """texts -> input_ids [len(texts), length] (int64)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for text in texts:
            if not isinstance(text, str):
                raise InputError(f"a text must be a string, got {shown(text)}")
            ids = self._encode(text)[: self.length]
            rows.append(ids + [self.pad_id] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.length)
