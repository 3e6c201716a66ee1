"""Several questions about one image in one training sequence, sharing its image tokens.

    <image> x N | <bos> prompt 1 \\n answer 1 <eos> | <bos> prompt 2 \\n answer 2 <eos> | ... | <pad> ...

Each question sees the image and itself, never another question: within a question the prefix-LM rule
holds (full attention over its prompt, causal over its answer), and its positions continue from the image
as if it were alone (N + 1, N + 2, ...), so each answer is scored exactly as in an unpacked sequence except
for one thing: the image tokens attend to the image only, where at inference they also see the prompt.
That is what makes them shareable (their states no longer depend on the question), and it has a cost:
a model trained packed never learns image features that depend on the prompt, and unpacked steps late in
training did not teach them either (measured in shapes/README.md; detection, which needs them to list two
of three kinds, stays near 0.89).

Cost: an image asked six questions takes N + 6 x ~25 tokens instead of 6 x (N + ~25).
"""

from __future__ import annotations

import torch

from paligemma.model import additive
from paligemma.processor import load_image, preprocess_image
from paligemma.train import IGNORE

IMAGE, PADDING = 0, -1  # segment ids; questions are 1, 2, ...


def packed_batch(processor, images, questions_per_image) -> dict[str, torch.Tensor]:
    """images[i] asked questions_per_image[i] = [(prefix, suffix), ...] -> right-padded input_ids, labels,
    positions, segments, token_type_ids [B, T] and pixel_values [B, 3, S, S]."""
    rows = []
    for questions in questions_per_image:
        ids, types, segments, positions = [], [], [], []
        for number, (prefix, suffix) in enumerate(questions, 1):
            question_ids, question_types = processor.prompt_ids(prefix, suffix)
            if not ids:  # the image tokens come once, first
                ids += question_ids[: processor.num_image_tokens]
                types += [0] * processor.num_image_tokens
                segments += [IMAGE] * processor.num_image_tokens
                positions += list(range(1, processor.num_image_tokens + 1))
            own = question_ids[processor.num_image_tokens :]
            ids += own
            types += question_types[processor.num_image_tokens :]
            segments += [number] * len(own)
            positions += list(range(processor.num_image_tokens + 1, processor.num_image_tokens + 1 + len(own)))
        rows.append((ids, types, segments, positions))
    length = max(len(r[0]) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), processor.pad_id, dtype=torch.long),
        "token_type_ids": torch.zeros((len(rows), length), dtype=torch.long),
        "segments": torch.full((len(rows), length), PADDING, dtype=torch.long),
        "positions": torch.ones((len(rows), length), dtype=torch.long),
    }
    for i, row in enumerate(rows):
        for key, values in zip(("input_ids", "token_type_ids", "segments", "positions"), row):
            batch[key][i, : len(values)] = torch.tensor(values)
    is_suffix = (batch["token_type_ids"] == 1) & (batch["segments"] != PADDING)
    batch["labels"] = batch["input_ids"].masked_fill(~is_suffix, IGNORE)
    batch["pixel_values"] = torch.stack([preprocess_image(load_image(image), processor.image_size) for image in images])
    return batch


def packed_mask(segments: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
    """Which keys each token may attend to, bool [B, 1, 1, T, T]: the image (every token, the image tokens
    included, sees all of it), and within its own question the prompt and the answer up to itself."""
    T = segments.shape[1]
    positions = torch.arange(T, device=segments.device)
    causal = positions[None, :] <= positions[:, None]  # [query, key]
    same_question = segments[:, :, None] == segments[:, None, :]
    key_in_prefix = (token_type_ids == 0)[:, None, :]
    key_is_image = (segments == IMAGE)[:, None, :]
    key_is_real = (segments != PADDING)[:, None, :]
    allowed = (key_is_image | (same_question & (key_in_prefix | causal[None]))) & key_is_real
    return allowed[:, None, None]


def packed_hidden(model, batch: dict, image_embeddings: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states [B, T, C] for a packed batch (logits are left to the caller, who
    needs them at the label positions only)."""
    if model.windows != {None}:
        raise ValueError("packed sequences are built for full-attention decoders; this one has sliding windows")
    x = model.embed(batch["input_ids"], image_embeddings)
    mask = additive(packed_mask(batch["segments"], batch["token_type_ids"]), x.dtype)
    return model.decoder(x, batch["positions"], {None: mask})
