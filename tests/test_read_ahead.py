"""The generation loop's read-ahead (on a GPU it queues each decode step before reading the last tokens back):
forced on here on the CPU, it must give exactly the tokens of the plain loop, and spend at most one extra step.
It is the loop of a pipeline that runs each call alone (no batch engine: the static engine's on CUDA)."""

import pytest

import paligemma
from shapes import scenes as S

PROMPTS = ["caption en", "answer en how many shapes are there?", "detect circle ; square"]


@pytest.fixture(scope="module")
def pipe():
    loaded = paligemma.load()
    return paligemma.Pipeline(loaded.model, loaded.processor)  # each call alone: the loop that reads ahead


def counting(pipe):
    """Wraps the pipeline's engines so that their decode steps are counted."""
    calls = []
    make = pipe.engine_factory

    def factory():
        engine = make()
        step = engine.decode_step
        engine.decode_step = lambda tokens: (calls.append(1), step(tokens))[1]
        return engine

    pipe.engine_factory = factory
    return calls, lambda: setattr(pipe, "engine_factory", make)


@pytest.mark.parametrize("sampling", [{}, dict(do_sample=True, temperature=1.3, top_k=40, seed=5)])
def test_read_ahead_gives_the_plain_loops_tokens(pipe, sampling):
    images = [s.image for s in S.render_scenes(3, len(PROMPTS))]
    calls, restore = counting(pipe)
    try:
        runs = {}
        for ahead in (False, True):
            pipe.read_ahead = ahead
            calls.clear()
            runs[ahead] = pipe.generate(images, PROMPTS, max_new_tokens=40, **sampling), len(calls)
    finally:
        pipe.read_ahead = None
        restore()
    (plain, plain_steps), (ahead, ahead_steps) = runs[False], runs[True]
    assert [r.token_ids for r in ahead] == [r.token_ids for r in plain]
    assert [r.text for r in ahead] == [r.text for r in plain]
    # The rows end at different lengths, all before the budget: the loop's early stop is what is exercised.
    lengths = sorted(len(r.token_ids) for r in plain)
    assert lengths[0] < lengths[-1] < 39
    assert plain_steps == lengths[-1]  # one decode step per token after the first, plus the one that gave <eos>
    assert plain_steps <= ahead_steps <= plain_steps + 1


def test_read_ahead_streams_the_same_text(pipe):
    image = S.render_scene(4).image
    streams = {}
    for ahead in (False, True):
        pipe.read_ahead = ahead
        try:
            streams[ahead] = [(u.delta, u.token_ids, u.finished)
                              for u in pipe.stream(image, "caption en", max_new_tokens=30)]
        finally:
            pipe.read_ahead = None
    assert streams[True] == streams[False]
    assert streams[False][-1][2] and len(streams[False]) > 3
