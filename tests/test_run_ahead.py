"""The page's stream runs ahead of the page: the model never waits for an update to be sent."""

import threading
import time

import pytest

from demo.run_ahead import run_ahead


def counting(n, finished: threading.Event, produced: list):
    for i in range(n):
        produced.append(i)
        yield i
    finished.set()


def test_the_stream_runs_to_its_end_while_the_consumer_holds_its_first_update():
    finished, produced = threading.Event(), []
    stream = run_ahead(counting(500, finished, produced))
    first = next(stream)
    assert finished.wait(timeout=60)  # in lockstep it would stand at the first update
    rest = list(stream)
    assert [first, *rest][-1] == 499 and len(rest) <= 1  # what piled up is merged into the newest


def test_every_update_in_order_when_the_consumer_keeps_up_and_the_last_always():
    seen = list(run_ahead(iter(range(50))))
    assert seen == sorted(set(seen)) and seen[-1] == 49


def test_an_error_in_the_stream_reaches_the_consumer_after_the_updates_before_it():
    def failing():
        yield "first"
        raise ValueError("the prompt is empty")

    stream = run_ahead(failing())
    with pytest.raises(ValueError, match="the prompt is empty"):
        assert next(stream) == "first"
        next(stream)


def test_closing_stops_the_stream_and_closes_it():
    closed, produced = threading.Event(), []

    def endless():
        try:
            while True:
                produced.append(1)
                yield len(produced)
        finally:
            closed.set()

    stream = run_ahead(endless())
    next(stream)
    stream.close()
    assert closed.is_set()
    count = len(produced)
    assert len(produced) == count  # nothing runs after the close returned


def test_closing_sets_the_stop_event_it_was_given():
    """The app hands the same event to the pipeline's stream (its `cancel`): a visitor who leaves ends the call."""
    stop, finished, produced = threading.Event(), threading.Event(), []
    stream = run_ahead(counting(10**6, finished, produced), stop=stop)
    next(stream)
    stream.close()
    assert stop.is_set() and not finished.is_set()


def test_updates_come_at_most_once_an_interval_and_the_last_at_once():
    def slow(n):
        for i in range(n):
            time.sleep(0.002)
            yield i

    times, seen = [], []
    for update in run_ahead(slow(100), min_interval=0.05):
        times.append(time.monotonic())
        seen.append(update)
    assert seen[-1] == 99 and len(seen) < 20  # about 0.2 s of updates, every 0.05 s at most
    assert all(later - earlier >= 0.049 for earlier, later in zip(times[:-2], times[1:-1]))
