"""The engines: the static-cache engine (CUDA's default; here on the CPU, uncompiled) gives the eager engine's
tokens, each request on a cache of its own; its decode step traces as one graph, as torch.compile needs on a GPU."""

import pytest
import torch

import paligemma
from paligemma.engines import DecodeRows, DecodeStep, StaticEngines, TorchEngine
from paligemma.masks import extend_for_generation

PROMPTS = ["caption en", "answer en how many shapes are there?"]  # different lengths: the first row is padded
SAMPLING = {"greedy": {}, "seeded": dict(do_sample=True, temperature=1.0, top_k=50, seed=7)}


@pytest.mark.parametrize("variant", ["pg1", "pg2"])  # pg2: a sliding window (6) shorter than every prompt
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_static_engine_gives_the_eager_tokens(reference_factory, images, variant, sampling):
    folder, _ = reference_factory(variant)
    eager = paligemma.load(folder, engine="eager")
    static = paligemma.load(folder, engine="static")
    assert isinstance(static.engine_factory, StaticEngines)
    inputs = eager.processor(images[:2], PROMPTS)
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()
    expected = eager.generate(images[:2], PROMPTS, max_new_tokens=12, **SAMPLING[sampling])
    assert static.batcher.engine.static  # the calls run on the static batch (buckets of rows, a fixed pool)
    for _ in range(2):  # the second call reuses the first one's rows
        got = static.generate(images[:2], PROMPTS, max_new_tokens=12, **SAMPLING[sampling])
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    alone = paligemma.Pipeline(static.model, static.processor, static.engine_factory)  # each call on its own cache
    for _ in range(2):  # the second call reuses the first one's cache
        got = alone.generate(images[:2], PROMPTS, max_new_tokens=12, **SAMPLING[sampling])
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    assert len(static.engine_factory.pool) == 1


def test_requests_at_once_each_have_their_own_cache(reference_factory, images):
    """Two requests decoding in turns give each its own logits, as when run alone."""
    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder, engine="static")
    requests = [pipe.processor([images[0]], [PROMPTS[0]]), pipe.processor([images[1]], [PROMPTS[1]])]

    def alone(inputs):
        engine = pipe.engine_factory()
        steps = [engine.prefill(inputs, 6)]
        for _ in range(5):
            steps.append(engine.decode_step(steps[-1].argmax(-1)))
        return steps

    expected = [alone(inputs) for inputs in requests]
    engines = [pipe.engine_factory() for _ in requests]
    steps = [[engine.prefill(inputs, 6)] for engine, inputs in zip(engines, requests)]
    assert engines[0].pooled.cache is not engines[1].pooled.cache
    for _ in range(5):
        for engine, logits in zip(engines, steps):
            logits.append(engine.decode_step(logits[-1].argmax(-1)))
    for got, want in zip(steps, expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    del engines, steps
    pipe.engine_factory().prefill(requests[0], 4)
    assert len(pipe.engine_factory.pool) == 2  # a dropped engine's cache goes back to the pool


def test_decode_step_traces_as_one_graph(reference_factory, images):
    """What torch.compile(fullgraph=True) needs on a GPU, checked here with a backend that runs on the CPU: no graph
    break, the cache written in place, the same logits as the uncompiled step."""
    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder, engine="static")
    inputs = pipe.processor(images[:2], PROMPTS)
    engine = pipe.engine_factory()
    engine.prefill(inputs, 4)
    cache = engine.pooled.cache
    tokens, index = torch.tensor([[5], [9]]), engine.index
    step = DecodeStep(pipe.model)
    args = (tokens, index, cache.keys.clone(), cache.values.clone(), cache.real, cache.autoregressive)
    compiled_args = (tokens, index, cache.keys.clone(), cache.values.clone(), cache.real, cache.autoregressive)
    with torch.no_grad():
        expected = step(*args)
        got = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)(*compiled_args)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(compiled_args[2], args[2]) and torch.equal(compiled_args[3], args[3])


def test_batch_decode_step_traces_as_one_graph(reference_factory, images):
    """The static batch's step (DecodeRows over a bucket of rows, one idle) compiles without a graph break and gives
    the uncompiled step's logits, each row's cache written at its own slot."""
    folder, _ = reference_factory("pg2")
    pipe = paligemma.load(folder, engine="static", max_batch=4)
    engine = pipe.batcher.engine
    for image, prompt in zip(images, [*PROMPTS, PROMPTS[0]]):
        engine.join(engine.prefill(pipe.processor([image], [prompt]), 4)[0])
    pool = engine.pool
    tokens = torch.tensor([[5], [9], [7], [0]])
    lengths = torch.cat([pool.lengths[:3], torch.zeros(1, dtype=torch.long)])  # the fourth row of the bucket idle
    step = DecodeRows(pipe.model)

    def args():
        return tokens, lengths, pool.keys[:, :4].clone(), pool.values[:, :4].clone(), pool.autoregressive[:4]

    plain, compiled = args(), args()
    with torch.no_grad():
        expected = step(*plain)
        got = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)(*compiled)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(compiled[2], plain[2]) and torch.equal(compiled[3], plain[3])
    written = plain[2][:, torch.arange(3), :, lengths[:3]]  # [3, L, K, D]: each row's new key, at its own slot
    assert not torch.equal(written, pool.keys[:, :3][:, torch.arange(3), :, lengths[:3]])


def test_engine_defaults_and_choices(reference_factory):
    folder, _ = reference_factory("pg1")
    assert isinstance(paligemma.load(folder).engine_factory(), TorchEngine)  # CPU: eager
    with pytest.raises(ValueError, match="engine 'fast' is not one of eager, static"):
        paligemma.load(folder, engine="fast")
    with pytest.raises(ValueError, match="engine is for backend 'torch'"):
        paligemma.load(folder, backend="onnx", engine="eager")


def test_stop_ids_are_a_call_argument(reference_factory, images):
    folder, _ = reference_factory("pg1")
    pipe = paligemma.load(folder)
    assert pipe.stop_ids == {1}  # the tiny config's end-of-sequence id
    with pytest.raises(AttributeError):
        pipe.stop_ids = set()
    unstopped = pipe.generate(images[0], PROMPTS[0], max_new_tokens=12, stop_ids=()).token_ids
    assert len(unstopped) == 12
    stop = unstopped[4]
    stopped = pipe.generate(images[0], PROMPTS[0], max_new_tokens=12, stop_ids=[stop]).token_ids
    assert stopped == unstopped[: unstopped.index(stop)]
    streamed = [u.token_ids for u in pipe.stream(images[0], PROMPTS[0], max_new_tokens=12, stop_ids=[stop])][-1]
    assert streamed == stopped


def test_generated_tokens_extend_the_masks_as_real_and_autoregressive():
    mask, types = extend_for_generation(torch.tensor([[0, 1, 1]]), torch.tensor([[0, 0, 0]]), 2)
    assert mask.tolist() == [[0, 1, 1, 1, 1]] and types.tolist() == [[0, 0, 0, 1, 1]]


def test_a_static_engine_that_cannot_compile_falls_back_to_eager_unless_asked_for(
        reference_factory, monkeypatch, caplog):
    """On CUDA the default engine compiles at load; a failing compiler must not stop a default load."""
    from paligemma import engines

    class Uncompilable(StaticEngines):
        def __init__(self, model):
            super().__init__(model)
            self.cuda_graphs = True  # as on a GPU

        def warm_up(self, batch_size=1):
            raise RuntimeError("no C compiler")

    folder, _ = reference_factory("pg1")
    model = paligemma.load(folder).model
    monkeypatch.setattr(engines, "StaticEngines", Uncompilable)
    monkeypatch.setattr(engines, "default_engine", lambda device: "static")  # as on CUDA
    with pytest.raises(RuntimeError, match="could not compile its decode step .*no C compiler.*engine='eager'"):
        engines.make_engines(model, "static")
    factory = engines.make_engines(model)
    assert isinstance(factory(), TorchEngine) and "the eager engine serves instead" in caplog.text


def test_a_static_batch_that_cannot_compile_falls_back_to_the_eager_batch_unless_asked_for(
        reference_factory, monkeypatch, caplog):
    from paligemma import engines

    class Uncompilable(engines.BatchedTorchEngine):
        def __init__(self, model, max_batch, static=False):
            super().__init__(model, max_batch, static)
            self.cuda_graphs = static  # as on a GPU

        def warm_up(self):
            raise RuntimeError("no C compiler")

    folder, _ = reference_factory("pg1")
    model = paligemma.load(folder).model
    monkeypatch.setattr(engines, "BatchedTorchEngine", Uncompilable)
    static = engines.StaticEngines(model)
    with pytest.raises(RuntimeError, match="could not compile its decode step .*no C compiler.*engine='eager'"):
        engines.make_batch_engine(model, static, 4, required=True)
    batch = engines.make_batch_engine(model, static, 4)
    assert not batch.static and "the eager batch serves instead" in caplog.text
