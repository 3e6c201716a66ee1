"""The attention rule (paligemma.masks) against literal tables: 1 where a query (row) may attend to a key (column)."""

import torch

from paligemma.masks import TokenLayout, allowed_attention, token_positions
from shapes.packing import PADDING, packed_layout


def table(allowed: torch.Tensor, row: int = 0) -> list[list[int]]:
    return allowed[row, 0, 0].int().tolist()


def rule(real, autoregressive, queries=None, window=None, segments=None):
    real, autoregressive = torch.tensor([real]), torch.tensor([autoregressive])
    slots = torch.arange(real.shape[1]) if queries is None else torch.tensor(queries)
    return table(allowed_attention(real, autoregressive, slots, window, segments))


def test_big_vision_examples_causal_prefix_lm_and_blocks():
    """The three masks of big_vision's make_attn_mask docstring, from its "autoregressive" flags."""
    assert rule([1] * 4, [1, 1, 1, 1]) == [
        [1, 0, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ]
    assert rule([1] * 6, [0, 0, 0, 1, 1, 1]) == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]
    assert rule([1] * 10, [1, 0, 1, 0, 1, 0, 0, 1, 0, 0]) == [  # four blocks, each causal over the earlier ones
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ]


def test_prefix_lm_with_left_padding():
    """The processor's inputs: one padding slot, a prefix of 3 (type 0), a suffix of 2 (type 1). No key is padding;
    the padding query sees the prefix, as in the reference (nothing reads its output)."""
    attention_mask, token_type_ids = torch.tensor([[0, 1, 1, 1, 1, 1]]), torch.tensor([[0, 0, 0, 0, 1, 1]])
    expected = [
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 1],
    ]
    assert table(TokenLayout.last(attention_mask, token_type_ids, 6).allowed()) == expected
    # With the first 4 tokens cached, the 2 new ones are the last rows.
    assert table(TokenLayout.last(attention_mask, token_type_ids, 2).allowed()) == expected[4:]
    assert TokenLayout.last(attention_mask, token_type_ids, 6).positions().tolist() == [[1, 1, 2, 3, 4, 5]]


def test_window_shorter_than_the_prompt():
    """Gemma 2's sliding layers, window 2: the prefix keeps full attention; the suffix sees its last 2 slots."""
    assert rule([1] * 6, [0, 0, 0, 0, 1, 1], window=2) == [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]
    assert rule([1] * 5, [1] * 5, window=3) == [  # causal with a window (generated tokens)
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_static_slots():
    """A decode step over a static cache of 8 slots: slot 0 left padding, a prompt of 3 (slots 0-2), generated
    tokens from slot 3 on; the query is the token at slot 5. Slots 6 and 7 are not written yet."""
    real, autoregressive = [0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]
    assert rule(real, autoregressive, queries=[5]) == [[0, 1, 1, 1, 1, 1, 0, 0]]
    assert rule(real, autoregressive, queries=[5], window=3) == [[0, 0, 0, 1, 1, 1, 0, 0]]
    assert token_positions(torch.tensor([real]), torch.tensor([5])).tolist() == [[5]]


def test_packed_rows():
    """Row 0: the image (2 tokens), question 1 (prompt of 2, answer of 1), question 2 (prompt 1, answer 1), one
    padding slot. Each question sees the image and itself; the image sees itself only. Row 1: one question whose
    image tokens see its prompt (image_sees_prompt): the inference prefix-LM."""
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2, PADDING], [0, 0, 1, 1, 1, PADDING, PADDING, PADDING]])
    token_type_ids = torch.tensor([[0, 0, 0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 1, 0, 0, 0]])
    allowed = packed_layout(segments, token_type_ids, torch.tensor([False, True])).allowed()
    assert table(allowed, 0) == [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
    ]
    assert table(allowed, 1)[:5] == [  # padding rows left out: nothing reads them
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
    ]
