"""Several questions about one image in one training sequence, sharing its image tokens.

    <image> x N | <bos> prompt 1 \\n answer 1 <eos> | <bos> prompt 2 \\n answer 2 <eos> | ... | <pad> ...

Each question sees the image and itself, never another question: within a question the prefix-LM rule
holds (full attention over its prompt, causal over its answer), and its positions continue from the image
as if it were alone (N + 1, N + 2, ...), so each answer is scored exactly as in an unpacked sequence except
for one thing: the image tokens attend to the image only, where at inference they also see the prompt.
That is what makes them shareable (their states no longer depend on the question), and it has a cost:
a model trained packed never learns image features that depend on the prompt, and unpacked steps late in
training did not teach them either (measured in docs/embedded-model-experiments.md; detection, which needs them
to list two of three kinds, stays near 0.89).

Cost: an image asked six questions takes N + 6 x ~25 tokens instead of 6 x (N + ~25).

Questions picked by `alone` get a row of their own instead, with the image tokens seeing the prompt: the
exact attention of inference (their own copy of the image's embeddings, computed once per image).
`shapes.train --unpack-detections` uses it for the detections, which need prompt-conditioned image features;
measured, that path learns slowly and the packed questions then suffer from image tokens that read prompts
(docs/embedded-model-experiments.md), so the default recipe does not.
"""

from __future__ import annotations

import torch

from paligemma.masks import SHARED_SEGMENT, TokenLayout
from paligemma.processor import load_image, preprocess_image
from paligemma.train import IGNORE

IMAGE, PADDING = SHARED_SEGMENT, -1  # segment ids (every question sees the image); questions are 1, 2, ...


def packed_batch(processor, images, questions_per_image, alone=None) -> dict[str, torch.Tensor]:
    """images[i] asked questions_per_image[i] = [(prefix, suffix), ...] -> right-padded input_ids, labels,
    positions, segments, token_type_ids [R, T], the image of each row `row_image` and whether its image
    tokens see its prompt `image_sees_prompt` [R], and pixel_values [len(images), 3, S, S]. A question for
    which `alone(prefix)` is true gets a row of its own, ordered after its image's packed row."""
    alone = alone or (lambda prefix: False)
    groups = []  # (image index, questions in one row, image sees prompt)
    for image, questions in enumerate(questions_per_image):
        together = [q for q in questions if not alone(q[0])]
        groups += [(image, together, False)] if together else []
        groups += [(image, [q], True) for q in questions if alone(q[0])]
    rows = []
    for _, questions, _ in groups:
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
    batch["row_image"] = torch.tensor([image for image, _, _ in groups], dtype=torch.long)
    batch["image_sees_prompt"] = torch.tensor([sees for _, _, sees in groups], dtype=torch.bool)
    is_suffix = (batch["token_type_ids"] == 1) & (batch["segments"] != PADDING)
    batch["labels"] = batch["input_ids"].masked_fill(~is_suffix, IGNORE)
    size = processor.image_size
    batch["pixel_values"] = torch.stack([preprocess_image(load_image(image, size), size) for image in images])
    return batch


def packed_layout(segments: torch.Tensor, token_type_ids: torch.Tensor, image_sees_prompt: torch.Tensor) -> TokenLayout:
    """The attention rule's inputs (paligemma.masks) for packed rows [B, T]: every token sees the image (the shared
    segment), and within its own question the prompt and the answer up to itself. Each question's first token
    starts a block of its own, so the image tokens (block 0) do not see the prompts; in rows where
    `image_sees_prompt` [B] (rows of one question) the question joins the image's segment and block, which is
    exactly the prefix-LM of inference."""
    T = segments.shape[1]
    previous = torch.cat([torch.full_like(segments[:, :1], PADDING), segments[:, :-1]], 1)
    starts_question = (segments > IMAGE) & (segments != previous)
    starts_question &= ~image_sees_prompt[:, None]
    rule_segments = torch.where(image_sees_prompt[:, None], segments.clamp(max=IMAGE), segments)
    autoregressive = (token_type_ids == 1) | starts_question
    return TokenLayout(segments != PADDING, autoregressive, torch.arange(T, device=segments.device), rule_segments)


def packed_hidden(model, batch: dict, image_embeddings: torch.Tensor) -> torch.Tensor:
    """The decoder's final hidden states [R, T, C] for a packed batch from its images' embeddings (logits are
    left to the caller, who needs them at the label positions only)."""
    if model.windows != {None}:
        raise ValueError("packed sequences are built for full-attention decoders; this one has sliding windows")
    layout = packed_layout(batch["segments"], batch["token_type_ids"], batch["image_sees_prompt"])
    return model.run_decoder(batch["input_ids"], image_embeddings[batch["row_image"]], layout, batch["positions"])
