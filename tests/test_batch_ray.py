"""`python -m paligemma batch --ray`: the same job on a local Ray cluster of two actors gives the single-process run's
lines, and resumes the same way. One cluster for the module (starting one costs seconds)."""

import json

import pytest
import ray
import torch
from test_batch import draw, lines_of, run, without_timings

from paligemma.ray_batch import init_ray


@pytest.fixture(scope="module")
def cluster():
    init_ray(None, num_cpus=2)  # the command finds Ray initialized and uses this cluster
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_two_actors_on_a_local_cluster_give_the_single_process_lines_and_resume(cluster, tmp_path):
    folder = tmp_path / "scenes"
    draw(folder, range(24))
    (folder / "notes.png").write_text("not an image\n")
    alone, on_ray = tmp_path / "alone.jsonl", tmp_path / "ray.jsonl"
    assert run("--input", folder, "--out", alone) == 0
    expected = lines_of(alone)
    assert len(expected) == 25 and sum(r["error"] is not None for r in expected) == 1

    # Half of the answers already there, the last one cut short: the cluster answers the rest.
    first = [json.dumps(r) for r in expected[:12]]
    on_ray.write_text("\n".join(first) + "\n" + first[12 - 1][:20])
    assert run("--input", folder, "--out", on_ray, "--ray", "--workers", 2, "--cpus-per-worker", 1,
               "--batch-size", 4) == 0

    records = lines_of(on_ray)
    assert len(records) == 25 and len({r["id"] for r in records}) == 25
    assert without_timings(records) == without_timings(expected)


def test_ray_resources_are_checked_before_the_cluster_is_asked(cluster, tmp_path, capsys):
    draw(tmp_path / "scenes", [0])
    args = ("--input", tmp_path / "scenes", "--out", tmp_path / "answers.jsonl", "--ray")
    assert run(*args, "--gpus-per-worker", 1) == 1
    assert "add --device cuda" in capsys.readouterr().err
    assert run(*args, "--cpus-per-worker", 0) == 1
    assert "reserves nothing" in capsys.readouterr().err
