"""The layer-streamed torch reference (export.validation.torch_reference.layer_streamed) records what the whole model
records, holding one layer at a time."""

import os
import subprocess
import sys

import pytest
import torch

from bench.workloads import Workload
from export.validation.torch_reference import layer_streamed, load_streamed, record, torch_reference
from export.validation.validate import DECODE_STEPS, validation_requests
from paligemma.checkpoint import Checkpoint
from paligemma.engines import TorchEngine
from paligemma.processor import PaliGemmaProcessor

# Weights spread over layers (~15 MB each, 12 of them) and a 17 MB embedding (resident in the streamed reference):
# 0.2 GB in all, of which the streamed reference holds the embedding and one layer.
LAYERED = dict(
    vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, patch_size=14, image_size=28),
    text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
              vocab_size=8192),
    image_token_index=8100,
)


def quiet(*_):
    pass


def recorded(folder, load):
    model = load(Checkpoint.resolve(folder), torch.float32)
    return record(model, PaliGemmaProcessor.from_pretrained(folder, model.config))


def assert_same_record(got: dict, expected: dict) -> None:
    for got_run, run in zip(got["runs"], expected["runs"], strict=True):
        assert [t.tolist() for t in got_run["tokens"]] == [t.tolist() for t in run["tokens"]]
        for name in ("image_embeddings", "prefill"):
            torch.testing.assert_close(got_run[name], run[name], rtol=0, atol=1e-5)
        for got_step, step in zip(got_run["decode"], run["decode"], strict=True):
            torch.testing.assert_close(got_step, step, rtol=0, atol=1e-5)


def one_request_at_a_time(folder) -> dict:
    """What record() gives, run on the whole model request by request (record runs them as one batch)."""
    model = load_streamed(Checkpoint.resolve(folder), torch.float32)
    requests = validation_requests(PaliGemmaProcessor.from_pretrained(folder, model.config), model.config)
    runs = []
    with torch.inference_mode():
        for inputs in requests:
            engine = TorchEngine(model)
            logits = engine.prefill(inputs, DECODE_STEPS)
            run = dict(image_embeddings=model.embed_image(inputs["pixel_values"]), prefill=logits, tokens=[], decode=[])
            for _ in range(DECODE_STEPS):
                run["tokens"].append(logits.argmax(-1))
                logits = engine.decode_step(run["tokens"][-1])
                run["decode"].append(logits)
            runs.append(run)
    return dict(requests=requests, runs=runs)


@pytest.mark.parametrize("variant", ["pg1", "pg2"])
def test_the_layer_streamed_record_is_the_whole_models(reference_factory, variant):
    folder, _ = reference_factory(variant, "hub")  # the hub layout stores a tied lm_head as well
    whole = one_request_at_a_time(folder)
    assert_same_record(recorded(folder, load_streamed), whole)
    assert_same_record(recorded(folder, layer_streamed), whole)


def test_the_child_process_records_what_this_process_records(reference_factory):
    folder, _ = reference_factory("pg2")
    checkpoint = Checkpoint.resolve(folder)
    child = torch_reference(checkpoint, "float32", streamed=True, in_process=False)
    assert_same_record(child, torch_reference(checkpoint, "float32", in_process=True))


def test_small_checkpoints_are_recorded_in_process_and_large_ones_in_a_child(reference_factory, monkeypatch):
    from export.validation import torch_reference as module

    checkpoint = Checkpoint.resolve(reference_factory("pg1")[0])

    def no_child(*args, **kwargs):
        raise RuntimeError("a child process was started")

    monkeypatch.setattr(module.subprocess, "run", no_child)
    torch_reference(checkpoint, "float32")  # a few hundred KB: no child
    monkeypatch.setattr(module, "IN_PROCESS_BYTES", 1)
    with pytest.raises(RuntimeError, match="a child process was started"):
        torch_reference(checkpoint, "float32")


# glibc's malloc keeps freed memory for reuse, and how much depends on the order of allocations and frees: with its
# default (dynamic) threshold, allocations under 32 MB (this model's layer tensors) come from its heap once a larger
# one was freed, and stay resident after they are freed: measured 0.1-0.6 GB more for the same whole model from one
# run to the next, 0.44 GB for the streamed one. A fixed threshold maps every allocation of 128 KB or more on its
# own and unmaps it when freed, so that RssAnon is what the code holds. (At 3B every layer tensor is above 32 MB.)
def growth_bytes(code: str) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


# The peak of the process's anonymous resident memory (RssAnon, sampled every 2 ms) above its value once the
# libraries are imported: the library code that the first operations page in (hundreds of MB of torch and MKL,
# file-backed) is left out, and so are other processes' import-time peaks.
PROBE = """import threading, time, torch
from pathlib import Path
from export.validation import torch_reference
from paligemma.checkpoint import Checkpoint
from paligemma.processor import PaliGemmaProcessor

def anonymous():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

start = peak = anonymous()
done = False

def sample():
    global peak
    while not done:
        peak = max(peak, anonymous())
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
folder = Path({folder!r})
model = getattr(torch_reference, {load!r})(Checkpoint.read(folder), torch.float32)
torch_reference.record(model, PaliGemmaProcessor.from_pretrained(folder, model.config))
done = True
sampler.join()
print(max(peak, anonymous()) - start)
"""


def test_the_layer_streamed_reference_holds_one_layer_not_the_model(tmp_path_factory):
    workload = Workload("layered", "weights spread over layers", LAYERED, vision_layers=1, text_layers=12)
    folder = workload.prepare(tmp_path_factory.mktemp("layered"), log=quiet)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    whole = growth_bytes(PROBE.format(folder=str(folder), load="load_streamed"))
    streamed = growth_bytes(PROBE.format(folder=str(folder), load="layer_streamed"))
    sizes = f"whole model +{whole / 1e6:.0f} MB, streamed +{streamed / 1e6:.0f} MB, weights {weights / 1e6:.0f} MB"
    assert whole > 0.9 * weights, sizes  # the probe sees the model when it is held
    # Both share the same working memory (whole - weights, ~40 MB here); beyond it the streamed reference holds the
    # embedding (9%) and one layer (8%).
    assert streamed - (whole - weights) < 0.4 * weights, sizes
