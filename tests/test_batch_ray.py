"""`python -m paligemma batch --ray`: the same job on a local Ray cluster of two actors gives the single-process run's
lines, and resumes the same way; the code travels with the job where the cluster needs it. Two clusters for the
module (starting one costs seconds): the command's own, and a running one whose workers cannot import this checkout,
which the command joins by its address and, finding so, joins again with the code."""

import json
import logging
import os
import subprocess
import sys

import pytest
import ray
import torch
from test_batch import draw, lines_of, run, without_timings

import paligemma.ray_batch as ray_batch
from paligemma.ray_batch import code_must_travel


@pytest.fixture(autouse=True)
def torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_cluster():
    """Ray not initialized before the test, and shut down after it."""
    ray.shutdown()
    yield
    ray.shutdown()


# A cluster held by a process of its own, as `ray start --head` holds one; it prints its address and ends when its input
# closes. Token authentication (Ray's default for a new cluster) on both sides, with this machine's token.
CLUSTER_HOLDER = ("import sys, ray; ray.init(address='local', num_cpus=2, include_dashboard=False); "
                  "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def running_cluster(tmp_path_factory):
    """The address of a running local cluster whose workers cannot import this checkout (started from another
    folder, without PYTHONPATH; Ray puts a driver's folder on its workers' path), as a cluster of other machines."""
    env = {**{key: value for key, value in os.environ.items() if key != "PYTHONPATH"}, **TOKEN_AUTH}
    holder = subprocess.Popen([sys.executable, "-c", CLUSTER_HOLDER], cwd=tmp_path_factory.mktemp("elsewhere"),
                              env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        address = holder.stdout.readline().strip()
        assert address, "the cluster holder did not start"
        yield address
    finally:
        holder.stdin.close()  # it returns from its read and exits; its cluster ends with it
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()


def test_two_actors_on_a_local_cluster_give_the_single_process_lines_and_resume(no_cluster, tmp_path, caplog):
    folder = tmp_path / "scenes"
    draw(folder, range(24))
    (folder / "notes.png").write_text("not an image\n")
    alone, on_ray = tmp_path / "alone.jsonl", tmp_path / "ray.jsonl"
    assert run("--input", folder, "--out", alone) == 0
    expected = lines_of(alone)
    assert len(expected) == 25 and sum(r["error"] is not None for r in expected) == 1

    # Half of the answers already there, the last one cut short: a cluster of this machine answers the rest.
    first = [json.dumps(r) for r in expected[:12]]
    on_ray.write_text("\n".join(first) + "\n" + first[12 - 1][:20])
    with caplog.at_level(logging.INFO, logger=ray_batch.__name__):
        assert run("--input", folder, "--out", on_ray, "--ray", "--workers", 2, "--cpus-per-worker", 1,
                   "--batch-size", 4) == 0
    assert "the code imported from this checkout" in caplog.text  # the cluster it started inherits the path

    records = lines_of(on_ray)
    assert len(records) == 25 and len({r["id"] for r in records}) == 25
    assert without_timings(records) == without_timings(expected)


def test_the_code_travels_where_a_node_is_another_machine_or_cannot_import_this_checkout():
    assert not code_must_travel(["10.0.0.1", "10.0.0.1"], "10.0.0.1", workers_see_checkout=True)
    assert code_must_travel(["10.0.0.1", "10.0.0.2"], "10.0.0.1", workers_see_checkout=True)
    assert code_must_travel(["10.0.0.1"], "10.0.0.1", workers_see_checkout=False)


def test_the_command_joins_a_running_cluster_again_with_its_code_where_its_workers_cannot_import_it(running_cluster,
                                                                                                  tmp_path):
    folder = tmp_path / "scenes"
    draw(folder, range(3))
    alone, on_ray = tmp_path / "alone.jsonl", tmp_path / "ray.jsonl"
    assert run("--input", folder, "--out", alone) == 0

    # The driver in a folder of its own: the checkout reaches the workers only with the job.
    driver = tmp_path / "driver"
    driver.mkdir()
    args = ("--verbose", "batch", "--input", folder, "--out", on_ray, "--ray", running_cluster, "--workers", 1,
            "--cpus-per-worker", 1)
    done = subprocess.run([sys.executable, "-m", "paligemma", *map(str, args)],
                          cwd=driver, env={**os.environ, "PYTHONPATH": str(ray_batch.ROOT), **TOKEN_AUTH},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the code shipped with the job" in done.stderr
    assert without_timings(lines_of(on_ray)) == without_timings(lines_of(alone))


def test_ray_resources_are_checked_before_the_cluster_is_asked(tmp_path, capsys):
    draw(tmp_path / "scenes", [0])
    args = ("--input", tmp_path / "scenes", "--out", tmp_path / "answers.jsonl", "--ray")
    assert run(*args, "--gpus-per-worker", 1) == 1
    assert "add --device cuda" in capsys.readouterr().err
    assert run(*args, "--cpus-per-worker", 0) == 1
    assert "reserves nothing" in capsys.readouterr().err
