"""Who attends to whom, and at which position: the one rule every path builds its attention masks with (the torch
model, the exported graphs, the static-cache engine, packed training rows, ONNX Runtime's inputs).

Each token is described by plain per-token inputs: `real` (not padding), `autoregressive` (it starts a block of its
own: suffix and generated tokens; prefix tokens are not) and, in packed rows only, a `segment`. As in big_vision's
`make_attn_mask`, a token's block is the running count of autoregressive flags up to it, and a query attends to the
real keys whose block is not after its own: its own block both ways, earlier blocks causally.

Axes: B batch, S key slots (cached + new), T query tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SHARED_SEGMENT = 0  # keys of this segment are seen from every segment (the image in packed rows)


def allowed_attention(real: torch.Tensor, autoregressive: torch.Tensor, query_slots: torch.Tensor,
                      window: int | None = None, segments: torch.Tensor | None = None) -> torch.Tensor:
    """Which keys each query may attend to: bool [B, 1, 1, T, S].

    real, autoregressive [B, S] describe every key slot; query_slots [T] says which slots the queries are, the same
    in every row, or [B, T] row by row (a continuous batch, whose rows have different lengths).
    Autoregressive 0 0 0 1 1 (a prefix of 3 and a suffix of 2, as token_type_ids give it) makes the blocks
    0 0 0 1 2; on the right, the first slot is padding (real 0 1 1 1 1):

        query \\ key  p p p s s        query \\ key  _ p p s s
        p            1 1 1 0 0        _            0 1 1 0 0
        p            1 1 1 0 0        p            0 1 1 0 0
        p            1 1 1 0 0        p            0 1 1 0 0
        s            1 1 1 1 0        s            0 1 1 1 0
        s            1 1 1 1 1        s            0 1 1 1 1

    All autoregressive (1 1 1 1 1) is causal attention; none is full attention.
    `window` w (Gemma 2's sliding layers) drops keys of an earlier block that are w or more slots back; a block
    stays fully visible to itself, so the prefix keeps its full attention as in the reference.
    `segments` [B, S] (packed rows): a query sees only keys of its own segment and of SHARED_SEGMENT.
    """
    blocks = autoregressive.long().cumsum(-1)  # [B, S]
    key_blocks = blocks[:, None, :]
    query_blocks = at_slots(blocks, query_slots)[:, :, None]  # [B, T, 1]
    allowed = key_blocks <= query_blocks  # [B, T, S]
    if window is not None:
        slots = torch.arange(blocks.shape[-1], device=blocks.device)
        near = slots > query_slots[..., None] - window  # [T, S] or [B, T, S]
        allowed = allowed & (near | (key_blocks == query_blocks))
    if segments is not None:
        query_segments = at_slots(segments, query_slots)[:, :, None]
        allowed = allowed & ((segments[:, None, :] == query_segments) | (segments == SHARED_SEGMENT)[:, None, :])
    allowed = allowed & real.bool()[:, None, :]
    return allowed[:, None, None]


def at_slots(values: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """values [B, S] at the query slots: [T] the same in every row, or [B, T] row by row -> [B, T]."""
    if query_slots.dim() == 1:
        return values.index_select(-1, query_slots)
    return values.gather(-1, query_slots)


def token_positions(real: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] of the queries (slots [T] or [B, T]): the real tokens up to and including each, counted from
    1 as PaliGemma numbers them (left padding does not move them; a padding slot before any real token gets 1)."""
    return at_slots(real.long().cumsum(-1).clamp(min=1), query_slots)


def last_slots(num_keys: int, num_queries: int, device=None) -> torch.Tensor:
    """The slots [T] of the last `num_queries` of `num_keys` tokens: the new tokens after a cache's filled ones."""
    return torch.arange(num_keys - num_queries, num_keys, device=device)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one attention takes: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def extend_for_generation(attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                          max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt's attention_mask and token_type_ids [B, T] over a whole run [B, T + max_new_tokens]: generated
    tokens are real (1) and autoregressive (1)."""
    ones = torch.ones(attention_mask.shape[0], max_new_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([attention_mask, ones], 1), torch.cat([token_type_ids.to(ones.dtype), ones], 1)


@dataclass(frozen=True)
class TokenLayout:
    """The rule's inputs for one forward pass: real, autoregressive [B, S], query_slots [T] (or [B, T] row by row),
    segments [B, S] or None."""

    real: torch.Tensor
    autoregressive: torch.Tensor
    query_slots: torch.Tensor
    segments: torch.Tensor | None = None

    @classmethod
    def last(cls, attention_mask: torch.Tensor, token_type_ids: torch.Tensor, num_new: int) -> "TokenLayout":
        """The processor's inputs over S tokens (1 real / 0 padding; type 0 prefix, 1 suffix), querying the last
        `num_new`: the prefix-LM of PaliGemma."""
        S = attention_mask.shape[1]
        return cls(attention_mask, token_type_ids, last_slots(S, num_new, attention_mask.device))

    def allowed(self, window: int | None = None) -> torch.Tensor:
        return allowed_attention(self.real, self.autoregressive, self.query_slots, window, self.segments)

    def positions(self) -> torch.Tensor:
        return token_positions(self.real, self.query_slots)
