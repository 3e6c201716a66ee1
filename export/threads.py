"""How ONNX Runtime's threads are set: intra-op threads per session and how many requests run at once, chosen
together from the machine's cores and the model's size (measured: docs/runtime.md "Runtime choices").

A small model's operators are too small to split: the embedded model (6 M parameters) decodes faster on one
intra-op thread than on two, and two requests at once, one thread each, answer more requests per second. A large
model's matrix products do split: on the 3B-wide model two threads cut the time to first token by 40%, so one
request takes every core. Spinning (threads busy-waiting between operators, ONNX Runtime's default) is off: it never
helped here, and it takes the cores that another request, or the server, needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SMALL_MODEL_BYTES = 256 * 2**20  # decoder weights below this: one intra-op thread per request


@dataclass(frozen=True)
class ThreadPlan:
    intra_op_threads: int  # per session; a request runs one session at a time
    concurrent_requests: int  # how many requests should run at once (the app's concurrency limit)

    def describe(self) -> str:
        return (f"{self.intra_op_threads} thread{'s' if self.intra_op_threads > 1 else ''} per request, "
                f"{self.concurrent_requests} at once")


def available_cores() -> int:
    return len(os.sched_getaffinity(0))


def plan_threads(weight_bytes: int, cores: int | None = None, threads: int | None = None,
                 requests: int | None = None) -> ThreadPlan:
    """The settings for a model of `weight_bytes` on `cores` (default: the cores this process may use); `threads`
    and `requests` override the choice, and the rest follows from them."""
    cores = cores or available_cores()
    for name, value in (("threads", threads), ("requests", requests)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}={value!r}: use a whole number of at least 1")
    if threads is None:
        per_request = 1 if weight_bytes < SMALL_MODEL_BYTES else cores
        threads = per_request if requests is None else max(1, cores // requests)
    if requests is None:
        requests = max(1, cores // threads)
    return ThreadPlan(threads, concurrent_requests=requests)
