"""`python -m paligemma batch --ray [ADDRESS]`: the batch job on a Ray cluster, with Ray Data.

The pending inputs become a dataset; `map_batches` hands them, `batch_size` at a time, to a pool of `workers` actors
(`RayWorker`), each of which loads one pipeline in its constructor and answers its batches with the same Answerer as
the single-process command (its readers ahead of its continuous batch); each actor takes two batches at once, so its
batch stays full while the next one arrives. The driver iterates the answer lines and writes the one answers file
itself (as the command on one machine: resumable the same way).

The code reaches actors on other machines with the job (Ray's runtime_env `py_modules`: this package and export/, the
embedded model inside it); on a cluster of this machine alone the actors import it from this checkout, as the driver
does (shipping it cost each run 3-5 s before its first answer on 2 cores). Each node needs the
requirements (requirements.txt, requirements-ray.txt) and the model (`--model`: a path that exists on every node, or
a Hub id each node can download). docs/datasets.md says how to run it.

Ray is imported on use: `import paligemma` never needs it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .batch_io import CPU_ROWS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_READERS, Item, answer_line, item_from_json, item_json

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_PACKAGES = ("paligemma", "export")  # what an actor imports; the embedded model is inside paligemma/
CALLS_PER_ACTOR = 2  # batches an actor answers at once: the next one's rows join while the last one's finish
BATCH_ROWS_FACTOR = 4  # default batch_size: this many inputs per row of an actor's continuous batch
GPU_ROWS = 64  # with CPU_ROWS (paligemma.batch_io): an actor's batch rows when max_batch is not given


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: a local cluster of this machine's cores, for this run
    workers: int | None = None  # None: as many as the cluster's CPUs (or GPUs) hold
    cpus_per_worker: float | None = None  # None: 1
    gpus_per_worker: float | None = None  # None: 1 with device cuda, else 0
    batch_size: int | None = None  # None: BATCH_ROWS_FACTOR x the actor's batch rows
    ship_code: bool | None = None  # None: where the cluster needs it (init_ray)


def runtime_env() -> dict:
    """The code every actor imports, shipped with the job (Ray caches it by its content)."""
    return {"py_modules": [str(ROOT / name) for name in SHIPPED_PACKAGES],
            "excludes": ["__pycache__", "*.pyc"]}


def init_ray(address: str | None = None, ship_code: bool | None = None, **options) -> bool:
    """Connects to the cluster at `address` ("auto": the one this node has joined; HOST:PORT: its head), or starts a
    local one for this process (None: Ray's "local", even where this machine runs a cluster), whose workers find this
    checkout on their PYTHONPATH; nothing when Ray is initialized already (the caller set it up). The code travels
    with the job (`ship_code`; None: where code_must_travel says so once connected: Ray takes a job's code only as
    it connects, so a cluster that needs it is joined again with it). `options` go to ray.init (a local cluster's
    num_cpus, for one). True when it connected (the caller's to shut down), False when Ray was initialized."""
    import ray

    if ray.is_initialized():
        return False
    # Its warning that the embedded model (inside paligemma/) is a large file to ship: it is meant to travel.
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.ERROR)
    try:
        shipped = ship_code is True
        with checkout_on_path() if address is None and not shipped else nullcontext():
            connect(address, shipped, **options)
        if ship_code is None and address is not None:
            nodes = [node["NodeManagerAddress"] for node in ray.nodes() if node.get("Alive")]
            if code_must_travel(nodes, ray.util.get_node_ip_address(), Path.cwd().resolve() == ROOT):
                ray.shutdown()
                connect(address, shipped := True, **options)
        logger.info("Ray: the code %s", "shipped with the job" if shipped else "imported from this checkout")
        return True
    except ConnectionError as e:
        hint = "" if os.environ.get("RAY_AUTH_MODE") else (
            "; if the cluster uses token authentication (Ray's, where its head has a token), set RAY_AUTH_MODE=token "
            "and give this machine the head's token (RAY_AUTH_TOKEN, or its ~/.ray/auth_token)")
        raise ConnectionError(f"--ray {address}: {first_line(e)}; check that `ray start --head` runs there and the "
                              f"address{hint}") from None


def connect(address: str | None, ship_code: bool, **options) -> None:
    import ray

    ray.init(address=address or "local", runtime_env=runtime_env() if ship_code else None, include_dashboard=False,
             logging_level=logging.WARNING, **options)


@contextmanager
def checkout_on_path():
    """This checkout on PYTHONPATH while a local cluster starts: its processes, and so its workers, inherit it."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), before]))
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def code_must_travel(node_addresses: list[str], here: str, workers_see_checkout: bool) -> bool:
    """Whether the actors need the code shipped: yes when a node of the cluster is another machine, or when this
    machine's workers cannot import this checkout (they can where the driver runs in the checkout's folder: Ray puts
    the driver's working folder on its workers' path)."""
    return any(address != here for address in node_addresses) or not workers_see_checkout


class RayWorker:
    """One actor of the pool: one pipeline, loaded once; `__call__` answers a batch {"item": JSON texts of Items}
    with {"line": their answer lines} (in the order they finished)."""

    def __init__(self, load: dict, readers: int = DEFAULT_READERS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 threads: int | None = None, cores: int = 1):
        from .batch import Answerer, load_pipeline  # in the actor: the driver goes without torch

        self.answerer = Answerer(load_pipeline(load, threads), readers=readers, max_new_tokens=max_new_tokens,
                                 cores=cores)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        items = [item_from_json(str(text)) for text in batch["item"]]
        lines = [answer_line(record) for record in self.answerer.answer(items)]
        return {"line": np.array(lines, dtype=object)}


def worker_resources(settings: RaySettings, device: str) -> tuple[float, float]:
    cpus = 1.0 if settings.cpus_per_worker is None else settings.cpus_per_worker
    gpus = settings.gpus_per_worker if settings.gpus_per_worker is not None else 1.0 if device == "cuda" else 0.0
    if cpus == 0 and gpus == 0:
        raise ValueError("--cpus-per-worker 0 with no GPU per worker reserves nothing for an actor; give it at least "
                         "one CPU or one GPU")
    if device == "cuda" and gpus == 0:
        raise ValueError("--device cuda with --gpus-per-worker 0: an actor would have no GPU to run on; give each "
                         "actor a GPU (or a share of one, e.g. 0.5)")
    if device != "cuda" and gpus > 0:
        raise ValueError(f"--gpus-per-worker {gpus:g} reserves GPUs for a model that runs on the CPU; add --device "
                         "cuda")
    return cpus, gpus


def default_workers(cpus: float, gpus: float) -> int:
    """As many actors as the cluster's CPUs (or GPUs, when actors take GPUs) hold, at least one."""
    import ray

    resources = ray.cluster_resources()
    fits = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 0) / cpus
    return max(1, int(fits))


def answer_on_ray(items: list[Item], load: dict, settings: RaySettings, *, readers: int = DEFAULT_READERS,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, threads: int | None = None) -> Iterator[str]:
    """Answer lines of `items` computed by a pool of actors on the cluster, as Ray Data returns them."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray: pip install -r requirements-ray.txt") from None
    device = load.get("device", "cpu")
    cpus, gpus = worker_resources(settings, device)
    connected = init_ray(settings.address, settings.ship_code)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command's own bar counts the lines
    context.print_on_execution_start = False
    workers = settings.workers or default_workers(cpus, gpus)
    rows = load.get("max_batch") or (GPU_ROWS if device == "cuda" else CPU_ROWS)
    batch_size = settings.batch_size or BATCH_ROWS_FACTOR * rows
    if threads is None and cpus >= 1:
        threads = int(cpus)  # the model's threads follow what the actor reserved
    logger.info("Ray: %d actor(s) of %g CPU and %g GPU, %d inputs per call", workers, cpus, gpus, batch_size)
    dataset = ray.data.from_items([{"item": item_json(item)} for item in items])
    # Two calls at a time in each actor, both running (the Answerer is thread-safe, and its batch is shared).
    pool = ray.data.ActorPoolStrategy(size=workers, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                      enable_true_multi_threading=True)
    answers = dataset.map_batches(
        RayWorker, fn_constructor_kwargs=dict(load=load, readers=readers, max_new_tokens=max_new_tokens,
                                              threads=threads, cores=max(1, int(cpus))),
        batch_size=batch_size, batch_format="numpy", compute=pool, num_cpus=cpus, num_gpus=gpus or None)
    try:
        for row in answers.iter_rows():
            yield str(row["line"])
    except ray.exceptions.RayError as e:
        raise RuntimeError(f"the Ray job failed: {first_line(e)}") from None
    finally:
        if connected:  # now, not at the interpreter's exit, where it took 0.5 s more (Ray 2.60, 2 cores)
            ray.shutdown()


def first_line(error: BaseException) -> str:
    """The last line of a remote error's text that says what went wrong (Ray wraps the actor's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    wanted = [line for line in lines if not line.startswith(("File ", "Traceback", "^", "~"))]
    return (wanted or lines or [type(error).__name__])[-1]
