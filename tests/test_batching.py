"""Continuous batching (paligemma/scheduler.py): calls made at the same time decode together, and each call's tokens
are those it gives alone: through the batch with nothing else running, and on the engine of one request, without
the batch (the loop tested against transformers elsewhere). Eager torch, the static batch (uncompiled on the CPU:
buckets of rows over a fixed pool) and ONNX Runtime's fused decode, on tiny
PaliGemma 1 and 2 (a sliding window, 6, shorter than every prompt), greedy and seeded; rows join mid-flight, leave,
wait for a row, fail or disconnect.

The steps are driven by the test: a wrapper around the engine records each decode step's rows and, at chosen steps,
submits more calls from other threads and waits until they are prefilled, so that they join at the next step
(never by timing)."""

import threading
import time

import onnx
import pytest
import torch
from conftest import random_image
from tiny import build_reference

import paligemma
from bench.workloads import Workload
from export.runtime.pipeline import OnnxBatchEngine
from export.writer.onnx_export import export_model
from paligemma.engines import BatchedTorchEngine
from paligemma.scheduler import GATHERED_PREFILL_ROWS, Scheduler

PROMPTS = ["caption en", "answer en what is in the image and where is it", "detect cat ; dog",
           "segment the red car"]
SAMPLING = {"greedy": {}, "seeded": dict(do_sample=True, temperature=1.5, top_p=0.9)}
TIMEOUT_S = 60


@pytest.fixture(scope="module", params=["pg1", "pg2"])
def folder(request, tmp_path_factory):
    """A tiny checkpoint whose head_dim (32) ONNX Runtime's fused decode takes, and its export."""
    folder = tmp_path_factory.mktemp(f"batching_{request.param}")
    build_reference(folder, request.param, text=dict(head_dim=32))
    export_model(folder, folder / "onnx", progress=False, log=lambda *_: None)
    return folder


@pytest.fixture(scope="module", params=["torch", "static", "onnx"])
def pipe(request, folder):
    if request.param == "torch":
        return paligemma.load(folder, max_batch=3)
    if request.param == "static":  # on the CPU uncompiled: every step over the fixed pool, buckets of 1, 2, 3 rows
        return paligemma.load(folder, engine="static", max_batch=3)
    loaded = paligemma.load(folder, backend="onnx", onnx_dir=folder / "onnx", max_batch=3)
    assert loaded.engine_factory.fused is not None and loaded.engine_factory.fused_prepack
    return loaded


class Driven:
    """The pipeline's batch engine, wrapped: records the rows of every decode step, and before step k runs
    `actions[k]` (which start calls in threads) and waits until the calls it started are prefilled and waiting."""

    def __init__(self, pipe, actions):
        self.pipe, self.engine, self.actions = pipe, pipe.batcher.engine, actions
        self.steps: list[list[int]] = []
        self.threads: list[threading.Thread] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def decode(self, rows, tokens):
        action = self.actions.get(len(self.steps))
        if action is not None:
            started = action(self)
            deadline = time.monotonic() + TIMEOUT_S
            while len(self.pipe.batcher.scheduler.waiting) < started:
                assert time.monotonic() < deadline, "the calls started never reached the batch"
                time.sleep(0.001)
        self.steps.append(sorted(rows))
        return self.engine.decode(rows, tokens)

    def start(self, target) -> None:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        self.threads.append(thread)

    def __enter__(self):
        self.pipe.batcher.engine = self
        return self

    def __exit__(self, *exc):
        for thread in self.threads:
            thread.join(TIMEOUT_S)
        self.pipe.batcher.engine = self.engine


CALLS = [  # (image seed, prompt, budget, stop ids): different lengths and budgets
    (1, PROMPTS[0], 40, ()),  # exactly 40 tokens: it runs while the others join and leave
    (2, PROMPTS[1], 5, ()),
    (3, PROMPTS[2], 14, ()),
    (4, PROMPTS[3], 9, None),  # the model's own stop ids
]


def alone(pipe):
    """The same model and engine without the batch: each call runs alone on an engine of its own."""
    return paligemma.Pipeline(pipe.model, pipe.processor, pipe.engine_factory)


def run(pipe, call, sampling, seed):
    seed_image, prompt, budget, stop = call
    kwargs = dict(SAMPLING[sampling], seed=seed) if sampling == "seeded" else {}
    return pipe.generate(random_image(seed_image), prompt, max_new_tokens=budget, stop_ids=stop, **kwargs).token_ids


@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_rows_join_mid_flight_and_leave_with_their_solo_tokens(pipe, sampling):
    solo = [run(pipe, call, sampling, seed) for seed, call in enumerate(CALLS)]
    assert solo == [run(alone(pipe), call, sampling, seed) for seed, call in enumerate(CALLS)]
    assert len(solo[0]) == 40 and len(solo[1]) == 5
    got = [None] * len(CALLS)

    def call(i):
        def target():
            got[i] = run(pipe, CALLS[i], sampling, i)
        return target

    def join_two(driven):  # before step 3: two more calls are prefilled, to join a batch of one
        driven.start(call(1))
        driven.start(call(2))
        return 2

    def join_one_waiting(driven):  # before step 5 the batch is full (3 rows): this call waits for a row
        driven.start(call(3))
        return 0

    with Driven(pipe, {3: join_two, 5: join_one_waiting}) as driven:
        got[0] = run(pipe, CALLS[0], sampling, 0)
    assert got == solo
    sizes = [len(rows) for rows in driven.steps]
    assert sizes[:5] == [1, 1, 1, 1, 3]  # joined mid-flight, at the step after their prefill
    assert max(sizes) == 3  # never more than max_batch
    first = driven.steps[0][0]
    assert [i for i, rows in enumerate(driven.steps) if first in rows] == list(range(39))  # 40 tokens, 39 steps
    appearances = {row: sum(row in rows for rows in driven.steps) for row in driven.steps[4]}
    (second,) = [row for row, count in appearances.items() if count == 4]  # 5 tokens: steps 4 to 7
    (fourth,) = set().union(*driven.steps) - {first, *appearances}
    # The fourth waited for a row: it joined after the second had left.
    assert min(i for i, rows in enumerate(driven.steps) if fourth in rows) > 7


def test_a_list_call_is_rows_seeded_one_after_another(pipe):
    images, prompts = [random_image(5), random_image(6), random_image(7)], PROMPTS[:3]
    sampled = dict(SAMPLING["seeded"], max_new_tokens=10)
    together = pipe.generate(images, prompts, seed=11, **sampled)
    one_by_one = [pipe.generate(i, p, seed=11 + row, **sampled) for row, (i, p) in enumerate(zip(images, prompts))]
    assert [r.token_ids for r in together] == [r.token_ids for r in one_by_one]
    assert [r.token_ids for r in alone(pipe).generate(images, prompts, seed=11, **sampled)] == [
        r.token_ids for r in together]  # a padded batch without the scheduler: the same seeds
    assert together[0].token_ids != pipe.generate(images[0], prompts[0], seed=12, **sampled).token_ids


def test_a_failing_call_and_a_disconnect_leave_the_others_unchanged(pipe):
    calls = [(1, PROMPTS[0], 30, ()), (2, PROMPTS[1], 12, ()), (3, PROMPTS[2], 14, ())]
    solo = [run(alone(pipe), call, "greedy", 0) for call in calls]
    got, failures, streamed = [None] * 3, [], []
    cancel = threading.Event()

    def failing(image_, budget):
        def target():
            try:
                pipe.generate(image_, PROMPTS[0], max_new_tokens=budget)
            except paligemma.InputError as e:
                failures.append(str(e))
        return target

    def leaving():  # streams until the cancel before step 6, then its caller goes away
        for update in pipe.stream(random_image(8), PROMPTS[1], max_new_tokens=30, stop_ids=(), cancel=cancel):
            streamed.append(update)

    def join(driven):
        driven.start(lambda: got.__setitem__(1, run(pipe, calls[1], "greedy", 0)))
        driven.start(leaving)
        return 2

    def fail(driven):  # a file that is no image, a budget past the model's positions: refused before prefill
        driven.start(failing(b"not an image", 8))
        driven.start(failing(random_image(9), pipe.config.text.max_position_embeddings))
        return 0

    def disconnect(driven):
        cancel.set()
        return 0

    def after_disconnect(driven):  # the batch was full: this call gets the row the disconnected one freed
        driven.start(lambda: got.__setitem__(2, run(pipe, calls[2], "greedy", 0)))
        return 1

    with Driven(pipe, {2: join, 4: fail, 6: disconnect, 8: after_disconnect}) as driven:
        got[0] = run(pipe, calls[0], "greedy", 0)
    assert got == solo
    assert sorted(failures)[0].startswith("the file is not an image") and "positions" in sorted(failures)[1]
    assert [len(rows) for rows in driven.steps[2:10]] == [1, 3, 3, 3, 3, 2, 2, 3]  # left after step 6's cancel
    assert 0 < len(streamed) < 30 and not streamed[-1].finished
    assert pipe.batcher.scheduler.taken == 0 and pipe.batcher.engine.pool.rows == 0  # every row given back


def test_running_rows_keep_decoding_while_a_call_is_prefilled(pipe):
    """The prefill of a call runs in its caller's thread: held there until the running row has decoded five more
    tokens, it would never finish if the batch waited for it."""
    engine = pipe.batcher.engine
    steps_during_prefill = []
    prefill = engine.prefill
    first = threading.Event()

    def held_prefill(inputs, max_new_tokens):
        if first.is_set():  # the second call: wait for five steps of the first
            start = pipe.batcher.steps
            deadline = time.monotonic() + TIMEOUT_S
            while pipe.batcher.steps < start + 5:
                assert time.monotonic() < deadline, "the running row stopped while a call was prefilled"
                time.sleep(0.001)
            steps_during_prefill.append(pipe.batcher.steps - start)
        first.set()
        return prefill(inputs, max_new_tokens)

    engine.prefill = held_prefill
    try:
        stream = pipe.stream(random_image(1), PROMPTS[0], max_new_tokens=200, stop_ids=())
        next(stream)
        second = pipe.generate(random_image(2), PROMPTS[1], max_new_tokens=4, stop_ids=())
        stream.close()
    finally:
        del engine.prefill
    assert steps_during_prefill and steps_during_prefill[0] >= 5 and len(second.token_ids) == 4


GROUPED = [(11, PROMPTS[1], 9), (12, PROMPTS[0], 12), (13, PROMPTS[0], 7)]  # the two queued: one prompt length


def during_one_prefill(pipe, targets) -> list[int]:
    """Runs targets[0] in a thread, holds its prefill (in its caller's thread) until the other targets, started then,
    wait for theirs, and returns the rows of each prefill_many call meanwhile."""
    engine, groups = pipe.batcher.engine, []
    prefill, prefill_many = engine.prefill, getattr(engine, "prefill_many", None)
    held = threading.Event()

    def wait_for(condition, what):
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.001)

    def held_prefill(inputs, max_new_tokens):
        if not held.is_set():
            held.set()
            wait_for(lambda: len(pipe.batcher.arrivals) == len(targets) - 1, "the other calls never queued")
        return prefill(inputs, max_new_tokens)

    def counted_prefill_many(inputs, max_new_tokens):
        groups.append(len(inputs))
        return prefill_many(inputs, max_new_tokens)

    engine.prefill = held_prefill
    if prefill_many is not None:
        engine.prefill_many = counted_prefill_many
    threads = [threading.Thread(target=target) for target in targets]
    try:
        threads[0].start()
        wait_for(held.is_set, "the first call was never prefilled")
        for thread in threads[1:]:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
    finally:
        del engine.prefill
        if prefill_many is not None:
            del engine.prefill_many
    return groups


@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_calls_that_arrive_during_a_prefill_are_prefilled_together_with_their_solo_tokens(pipe, sampling):
    """A call that finds nothing running is prefilled at once; calls that arrive while a prefill runs queue, and the
    next prefill takes them all: one prefill_many call where the engine has it (ONNX Runtime), one prefill each
    otherwise. Each call's tokens stay its solo tokens."""
    calls = [(seed, prompt, budget, ()) for seed, prompt, budget in GROUPED]
    alone_pipe = alone(pipe)
    solo = [run(alone_pipe, call, sampling, 20 + i) for i, call in enumerate(calls)]
    got = [None] * len(calls)

    def call(i):
        def target():
            got[i] = run(pipe, calls[i], sampling, 20 + i)
        return target

    grouped = pipe.batcher.groups_prefills
    before = pipe.batcher.prefills
    groups = during_one_prefill(pipe, [call(i) for i in range(len(calls))])
    assert got == solo
    assert pipe.batcher.prefills - before == (2 if grouped else 3)
    assert groups == ([2] if grouped else [])


def test_a_gathered_prefill_takes_at_most_its_share_of_the_queue(pipe):
    """Calls queued beyond GATHERED_PREFILL_ROWS wait for the next prefill (a larger group prefills slower than one by
    one), in the order they came."""
    if not pipe.batcher.groups_prefills:
        pytest.skip("this engine prefills one call at a time")
    queued = GATHERED_PREFILL_ROWS + 1
    assert pipe.batcher.widen(queued + 1)
    try:
        calls = [(30 + i, PROMPTS[0], 5, ()) for i in range(queued + 1)]
        solo = [run(alone(pipe), call, "greedy", 0) for call in calls]
        got = [None] * len(calls)
        before = pipe.batcher.prefills
        groups = during_one_prefill(pipe, [lambda i=i: got.__setitem__(i, run(pipe, calls[i], "greedy", 0))
                                           for i in range(len(calls))])
    finally:
        assert pipe.batcher.widen(3)
    # The first alone, a group, and the one left over alone.
    assert groups == [GATHERED_PREFILL_ROWS] and pipe.batcher.prefills - before == 3 and got == solo


def test_a_lone_call_is_prefilled_at_once_and_a_list_call_as_one_group(pipe):
    images, prompts = [random_image(5), random_image(6), random_image(7)], [PROMPTS[0]] * 3
    before = pipe.batcher.prefills
    single = pipe.generate(images[0], prompts[0], max_new_tokens=6)
    assert pipe.batcher.prefills == before + 1 and not pipe.batcher.arrivals
    together = pipe.generate(images, prompts, max_new_tokens=6)
    grouped = pipe.batcher.groups_prefills
    assert pipe.batcher.prefills == before + (2 if grouped else 4)
    assert together[0].token_ids == single.token_ids
    assert [r.token_ids for r in together] == [r.token_ids for r in alone(pipe).generate(images, prompts,
                                                                                       max_new_tokens=6)]


def test_the_scheduler_admits_up_to_max_batch_rows_and_frees_them():
    scheduler = Scheduler(max_batch=2)
    assert scheduler.admit() and scheduler.admit() and not scheduler.admit()
    scheduler.give_back()
    assert scheduler.admit()


def test_max_batch_is_checked_and_defaults_from_the_device_and_memory(reference_factory):
    folder, _ = reference_factory("pg1")
    with pytest.raises(ValueError, match="max_batch=0"):
        paligemma.load(folder, max_batch=0)
    pipe = paligemma.load(folder)
    assert isinstance(pipe.batcher.engine, BatchedTorchEngine)
    assert pipe.max_batch == paligemma.default_max_batch(pipe.config, torch.device("cpu")) == 8
    static = paligemma.load(folder, engine="static", max_batch=5)
    assert static.batcher.engine.static and static.batcher.engine.pool.keys.shape[1] == 5  # a fixed pool


def test_the_batch_frees_its_caches_when_the_last_row_leaves(pipe):
    pipe.generate([random_image(1), random_image(2)], PROMPTS[:2], max_new_tokens=6)
    pool = pipe.batcher.engine.pool
    assert pool.rows == 0 and (pool.keys.numel() == 0) != pool.fixed  # a static pool keeps its fixed buffers


def test_int4_rows_keep_their_solo_bits_in_steps_of_row_pairs(tmp_path):
    """At int4's blocks of 128 (products at least 1024 wide), ONNX Runtime's MatMulNBits gives the last row of an odd
    number other bits than a row in a pair (`python -m bench.batch_decode --kernels`), so the ONNX Runtime engines
    decode an even number of rows, a spare one added: a row's logits, alone or beside one or two others, through the
    batch engine or the engine of one request, are the same bits."""
    shape = dict(vision=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=14, image_size=28),
                 text=dict(hidden_size=1024, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=1,
                           head_dim=256, vocab_size=1216),
                 image_token_index=1200)
    folder = Workload("wide_int4", "1024 wide", shape, vision_layers=1, text_layers=1).prepare(
        tmp_path, log=lambda *_: None)
    export_model(folder, tmp_path / "int4", quantize="int4", progress=False, log=lambda *_: None)
    graph = onnx.load(str(tmp_path / "int4" / "decode.onnx"), load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {128}
    pipe = paligemma.load(folder, backend="onnx", onnx_dir=tmp_path / "int4", max_batch=3)
    model = pipe.engine_factory
    assert model.row_multiple == 2

    prefilled, tokens = [], []
    for seed, prompt in enumerate(PROMPTS[:3]):
        row, logits = pipe.batcher.engine.prefill(pipe.processor([random_image(seed)], [prompt]), 4)
        prefilled.append(row)
        tokens.append(int(logits.argmax()))
    tokens = torch.tensor(tokens)

    def step(indices):
        engine = OnnxBatchEngine(model, 3)
        ids = [engine.join(prefilled[i]) for i in indices]
        return engine.decode(ids, tokens[indices])

    single = [step([i])[0] for i in range(3)]
    for indices in ([0, 1], [1, 2], [2, 0, 1]):
        together = step(indices)
        assert all(torch.equal(together[k], single[i]) for k, i in enumerate(indices)), indices
    engine = model()  # the engine of one request: its decode step too
    engine.prefill(pipe.processor([random_image(0)], [PROMPTS[0]]), 4)
    assert torch.equal(engine.decode_step(tokens[:1])[0], single[0]) and engine.fused

    # Prefilled together, the rows would not keep their solo bits (the prefill's last layer and logits run one row
    # per prompt: alone, MatMulNBits' odd row; in a group, pairs), so this engine prefills each row alone, and calls
    # that arrive during a prefill are prefilled one after another, each with its solo tokens.
    engine = pipe.batcher.engine
    assert not engine.exact_groups and not pipe.batcher.groups_prefills
    inputs = [pipe.processor([random_image(seed)], [PROMPTS[0]]) for seed in range(3)]
    together = engine.prefill_many(inputs, [4] * 3)
    assert all(torch.equal(logits, engine.prefill(x, 4)[1]) for x, (_, logits) in zip(inputs, together))
    calls = [(seed, PROMPTS[0], 6, ()) for seed in range(3)]
    solo = [run(alone(pipe), call, "greedy", 0) for call in calls]
    got = [None] * 3
    before = pipe.batcher.prefills
    assert during_one_prefill(pipe, [lambda i=i: got.__setitem__(i, run(pipe, calls[i], "greedy", 0))
                                     for i in range(3)]) == []
    assert got == solo and pipe.batcher.prefills - before == 3
