"""`python -m paligemma batch --ray`: the same job on a local Ray cluster of two actors gives the single-process run's
lines, and resumes the same way; the code travels with the job where the cluster needs it. Two clusters for the
module (starting one costs seconds): the command's own, and one the code is shipped to."""

import json
import logging

import pytest
import ray
import torch
from test_batch import draw, lines_of, run, without_timings

import paligemma.ray_batch as ray_batch
from paligemma.batch_io import read_items
from paligemma.ray_batch import RaySettings, answer_on_ray, code_must_travel, init_ray


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


@pytest.fixture(scope="module")
def shipping_cluster(tmp_path_factory):
    """A local cluster the job's code is shipped to, as to a cluster of several machines (started from another
    folder, without PYTHONPATH: Ray puts the driver's folder on its workers' path)."""
    ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))
        patch.delenv("PYTHONPATH", raising=False)  # the cluster's processes inherit it
        init_ray(None, ship_code=True, num_cpus=2)  # the command finds Ray initialized and uses this cluster
    yield
    ray.shutdown()


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


def test_shipped_code_is_what_the_actors_import_and_they_answer_the_same(shipping_cluster, tmp_path):
    @ray.remote
    def imported_from() -> str:
        import paligemma

        return paligemma.__file__

    shipped = ray.get(imported_from.remote())
    assert not shipped.startswith(str(ray_batch.ROOT)), shipped  # the copy Ray unpacked, not this checkout

    folder = tmp_path / "scenes"
    draw(folder, range(3))
    alone = tmp_path / "alone.jsonl"
    assert run("--input", folder, "--out", alone) == 0
    lines = answer_on_ray(read_items(folder, "caption en"), dict(path_or_repo_id=None, backend="onnx"),
                          RaySettings(workers=1, cpus_per_worker=1))
    assert without_timings(json.loads(line) for line in lines) == without_timings(lines_of(alone))


def test_ray_resources_are_checked_before_the_cluster_is_asked(shipping_cluster, tmp_path, capsys):
    draw(tmp_path / "scenes", [0])
    args = ("--input", tmp_path / "scenes", "--out", tmp_path / "answers.jsonl", "--ray")
    assert run(*args, "--gpus-per-worker", 1) == 1
    assert "add --device cuda" in capsys.readouterr().err
    assert run(*args, "--cpus-per-worker", 0) == 1
    assert "reserves nothing" in capsys.readouterr().err
