"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .errors import shown

MAX_NEW_TOKENS_LIMIT = 4096
# Logits are divided by max(temperature, this): a float32 still holds it, so no temperature the checks accept turns
# a logit into inf or nan. At this temperature only the largest logits keep any probability: sampling is greedy.
MIN_TEMPERATURE = 1e-30


def whole_number(value):
    """`value` as an int when it is one (numpy integers too), else None; booleans are not numbers here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def real_number(value):
    """`value` as a float when it is a finite real number within float range (numpy scalars too), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int with more digits than a float holds
        return None
    return number if number == number and abs(number) != float("inf") else None


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        def bad(name, value, rule):
            raise ValueError(f"{name}={shown(value)} is out of range: {rule}")

        def check(name, number, valid, rule):
            if number is None or not valid(number):
                bad(name, getattr(self, name), rule)
            object.__setattr__(self, name, number)  # numpy scalars become plain Python numbers

        check("max_new_tokens", whole_number(self.max_new_tokens), lambda n: 1 <= n <= MAX_NEW_TOKENS_LIMIT,
              f"use a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}")
        check("temperature", real_number(self.temperature), lambda t: 0 <= t <= 100,
              "use a number from 0 (greedy) to 100")
        check("top_p", real_number(self.top_p), lambda p: 0 < p <= 1, "use a number in (0, 1]; 1 disables top-p")
        check("top_k", whole_number(self.top_k), lambda k: k >= 0, "use a whole number >= 0; 0 disables top-k")
        if self.seed is not None:
            check("seed", whole_number(self.seed), lambda s: 0 <= s < 2**63,
                  "use a whole number from 0 to 2**63 - 1, or None for a random seed")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def generator(self, device="cpu", row: int = 0) -> torch.Generator | None:
        """The seeded generator of a call's `row`: rows of a list call sample independently, row i from seed + i
        (so row i gives what the same image and prompt alone give with seed + i); None when greedy."""
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed((self.seed + row) % 2**63)
        return generator


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scaled logits [B, V] (float32) with the tokens outside top-k / top-p set to -inf."""
    logits = logits.float()
    # Shifted so the largest is 0 before scaling: a tiny temperature sends the others towards -inf, never to nan.
    logits = (logits - logits.max(-1, keepdim=True).values) / max(temperature, MIN_TEMPERATURE)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token once the tokens before it already cover top_p; the most likely token always stays.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row [B] from logits [B, V], all rows drawn with one generator."""
    if params.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(logits: torch.Tensor, params: SamplingParams,
                generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row [B] from logits [B, V], each row drawn alone with its own generator: what the row would
    draw in a batch of one."""
    if params.greedy:
        return logits.argmax(-1)
    return torch.cat([sample(logits[i : i + 1], params, g) for i, g in enumerate(generators)])
