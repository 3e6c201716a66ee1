"""ONNX Runtime's threads and concurrent requests, chosen together for the machine and the model."""

import pytest

import paligemma
from export.runtime import load_onnx_pipeline
from export.threads import SMALL_MODEL_BYTES, ThreadPlan, plan_threads

SMALL, LARGE = 20 * 2**20, 3 * 2**30  # the embedded model's decoder, a 3B-wide one


@pytest.mark.parametrize("weight_bytes,cores,threads,requests,expected", [
    (SMALL, 2, None, None, ThreadPlan(1, concurrent_requests=2)),
    (SMALL, 8, None, None, ThreadPlan(1, concurrent_requests=8)),
    (SMALL, 1, None, None, ThreadPlan(1, concurrent_requests=1)),
    (LARGE, 2, None, None, ThreadPlan(2, concurrent_requests=1)),
    (LARGE, 16, None, None, ThreadPlan(16, concurrent_requests=1)),
    (SMALL, 2, 2, None, ThreadPlan(2, concurrent_requests=1)),  # asked-for threads set the rest
    (LARGE, 4, None, 2, ThreadPlan(2, concurrent_requests=2)),  # asked-for requests share the cores
    (LARGE, 2, 2, 2, ThreadPlan(2, concurrent_requests=2)),  # both asked for: as asked
    (SMALL_MODEL_BYTES, 2, None, None, ThreadPlan(2, concurrent_requests=1)),
])
def test_plan(weight_bytes, cores, threads, requests, expected):
    assert plan_threads(weight_bytes, cores, threads, requests) == expected


@pytest.mark.parametrize("bad", [dict(threads=0), dict(requests=-1), dict(threads=1.5), dict(requests=True)])
def test_bad_overrides_are_refused(bad):
    with pytest.raises(ValueError, match="use a whole number of at least 1"):
        plan_threads(SMALL, 2, **bad)


def test_the_sessions_run_the_plan():
    pipe = load_onnx_pipeline(paligemma.DEMO_CHECKPOINT, threads=1, requests=3)
    model = pipe.engine_factory
    assert model.thread_plan == ThreadPlan(1, concurrent_requests=3)
    for session in model.sessions.values():
        options = session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"  # off: export/threads.py


def test_the_embedded_model_runs_one_thread_per_request_by_default():
    assert paligemma.load(backend="onnx").engine_factory.thread_plan.intra_op_threads == 1
