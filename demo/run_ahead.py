"""Generation that does not wait for the page: the stream runs in a thread of its own, and the page takes the newest
update whenever it is ready for one.

Gradio advances a generator handler one item per message it sends. Driven that way, the pipeline stands still while
each update is diffed, queued and sent, and its timings measure the page as much as the model (measured: the page
read half the decode rate of the same pipeline run in-process). Here the model runs at its own speed; updates that
pile up between two messages are merged, the newest one standing for them (each carries all the text so far)."""

from __future__ import annotations

import threading
import time
from typing import Iterator, TypeVar

T = TypeVar("T")


def run_ahead(updates: Iterator[T], stop: threading.Event | None = None, min_interval: float = 0.0) -> Iterator[T]:
    """Yields the newest of `updates` each time it is asked, waiting only when there is none new, and at least
    `min_interval` seconds after the last one yielded; the last one is always yielded, as soon as it comes. An
    exception in the stream is raised here. Closing this generator sets `stop` and stops the
    stream at its next update (a visitor who leaves stops generation); a stream that watches `stop` itself
    (Pipeline.stream's `cancel`) ends sooner: a call still waiting for a row of the batch leaves the queue."""
    ready = threading.Condition()
    state = {"newest": None, "fresh": False, "done": False, "error": None}
    stop = stop or threading.Event()

    def produce():
        try:
            for update in updates:
                with ready:
                    state["newest"], state["fresh"] = update, True
                    ready.notify()
                if stop.is_set():
                    break
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            state["error"] = error
        finally:
            close = getattr(updates, "close", None)
            if close is not None:
                close()
            with ready:
                state["done"] = True
                ready.notify()

    producer = threading.Thread(target=produce, name="generation", daemon=True)
    producer.start()
    next_at = 0.0  # no update before this (time.monotonic), unless it is the last
    try:
        while True:
            with ready:
                while not state["done"]:
                    wait = next_at - time.monotonic()
                    if state["fresh"] and wait <= 0:
                        break
                    ready.wait(wait if state["fresh"] else None)
                fresh, newest, done = state["fresh"], state["newest"], state["done"]
                state["fresh"] = False
            if fresh:
                next_at = time.monotonic() + min_interval
                yield newest
            elif done:
                if state["error"] is not None:
                    raise state["error"]
                return
    finally:
        stop.set()
        producer.join()
