"""The layer-streamed torch reference (export.torch_reference.layer_streamed) records what the whole model records,
holding one layer at a time."""

import resource
import subprocess
import sys

import pytest
import torch

from bench.workloads import Workload
from export.torch_reference import layer_streamed, load_streamed, record, torch_reference
from paligemma.processor import PaliGemmaProcessor

# Weights spread over layers (~55 MB each, 6 of them) and a 128 MB embedding: the whole model is 0.47 GB, the
# largest unit the streamed reference holds is one layer.
LAYERED = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, patch_size=14, image_size=28),
    text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
              vocab_size=32768),
    image_token_index=32700,
)


def quiet(*_):
    pass


def recorded(folder, load):
    model = load(folder, torch.float32)
    return record(model, PaliGemmaProcessor.from_pretrained(folder, model.config))


def assert_same_record(got: dict, expected: dict) -> None:
    for got_run, run in zip(got["runs"], expected["runs"], strict=True):
        assert [t.tolist() for t in got_run["tokens"]] == [t.tolist() for t in run["tokens"]]
        for name in ("image_embeddings", "prefill"):
            torch.testing.assert_close(got_run[name], run[name], rtol=0, atol=1e-5)
        for got_step, step in zip(got_run["decode"], run["decode"], strict=True):
            torch.testing.assert_close(got_step, step, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["pg1", "pg2"])
def test_the_layer_streamed_record_is_the_whole_models(reference_factory, variant):
    folder, _ = reference_factory(variant, "hub")  # the hub layout stores a tied lm_head as well
    assert_same_record(recorded(folder, layer_streamed), recorded(folder, load_streamed))


def test_the_child_process_records_the_same_streamed_or_not(reference_factory):
    folder, _ = reference_factory("pg2")
    assert_same_record(torch_reference(folder, "float32", streamed=True), torch_reference(folder, "float32"))


def peak_rss_bytes(code: str) -> int:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1]) * 1024


def test_the_layer_streamed_reference_holds_one_layer_not_the_model(tmp_path_factory):
    workload = Workload("layered", "weights spread over layers", LAYERED, vision_layers=1, text_layers=6)
    folder = workload.prepare(tmp_path_factory.mktemp("layered"), log=quiet)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    probe = ("import resource, torch; from pathlib import Path; from export import torch_reference as r; "
             "from paligemma.processor import PaliGemmaProcessor; "
             f"m = r.{{load}}(Path({str(folder)!r}), torch.float32); "
             "r.record(m, PaliGemmaProcessor.from_pretrained(Path({folder!r}), m.config)); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)").replace("{folder!r}", repr(str(folder)))
    baseline = peak_rss_bytes("import resource, export.torch_reference; "
                              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    whole = peak_rss_bytes(probe.format(load="load_streamed")) - baseline
    streamed = peak_rss_bytes(probe.format(load="layer_streamed")) - baseline
    assert whole > 0.9 * weights  # the probe sees the model when it is held
    assert streamed < 0.3 * weights, f"streamed reference added {streamed / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
