"""Sampling: repeatable with a seed, greedy at the limits, and faithful to the truncated distribution."""

import pytest
import torch

import paligemma
from paligemma.sampling import SamplingParams, filter_logits, sample


def test_same_seed_same_tokens(reference_factory, images):
    folder, _ = reference_factory("pg1")
    pipe = paligemma.load(folder)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, top_k=50)
    first = pipe.generate(images[0], "caption en", seed=7, **kwargs)
    again = pipe.generate(images[0], "caption en", seed=7, **kwargs)
    other = pipe.generate(images[0], "caption en", seed=8, **kwargs)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids


def test_top_k_one_and_tiny_top_p_equal_greedy(reference_factory, images):
    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder)
    greedy = pipe.generate(images[1], "caption en", max_new_tokens=16)
    top_k = pipe.generate(images[1], "caption en", max_new_tokens=16, do_sample=True, top_k=1, seed=3)
    top_p = pipe.generate(images[1], "caption en", max_new_tokens=16, do_sample=True, top_p=1e-6, seed=3)
    assert top_k.token_ids == greedy.token_ids
    assert top_p.token_ids == greedy.token_ids


def empirical(logits, params, draws=20000):
    generator = torch.Generator().manual_seed(0)
    tokens = sample(logits.expand(draws, -1), params, generator)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def test_frequencies_follow_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    probs = torch.softmax(logits[0], -1)
    # top-k 3: renormalized over the 3 best
    expected = torch.zeros(6)
    expected[:3] = probs[:3] / probs[:3].sum()
    got = empirical(logits, SamplingParams(do_sample=True, top_k=3))
    assert (got - expected).abs().max() < 0.015
    # top-p: the smallest set whose mass reaches p
    p = float(probs[:2].sum()) + 0.01  # needs the third token
    expected = torch.zeros(6)
    expected[:3] = probs[:3] / probs[:3].sum()
    got = empirical(logits, SamplingParams(do_sample=True, top_p=p))
    assert (got - expected).abs().max() < 0.015
    # temperature 2: softmax(logits / 2)
    got = empirical(logits, SamplingParams(do_sample=True, temperature=2.0))
    assert (got - torch.softmax(logits[0] / 2, -1)).abs().max() < 0.015


def test_top_p_keeps_at_least_one_token_and_is_stable():
    logits = torch.tensor([[1e4, -1e4, 0.0]])
    filtered = filter_logits(logits, 1.0, 0, 1e-9)
    assert torch.isfinite(filtered[0, 0]) and torch.isinf(filtered[0, 1:]).all()
    probs = torch.softmax(filter_logits(torch.tensor([[1e30, 1e30, -1e30]]), 1.0, 0, 0.5), -1)
    assert torch.isfinite(probs).all()


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(max_new_tokens=0), dict(max_new_tokens=10**6), dict(seed=-5),
                                 dict(temperature=float("nan")), dict(top_k=2.5)])
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(ValueError, match="out of range"):
        SamplingParams(**bad)
