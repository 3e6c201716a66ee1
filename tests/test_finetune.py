"""Fine-tuning: LoRA against its merge and against peft on transformers' PaliGemma, frozen parts, bfloat16 frozen
weights, gradient checkpointing and accumulation, resume, torchrun (DDP and FSDP2 over two gloo processes), evaluation
by generation, the export after training, and the one-line errors. Tiny PaliGemma 1 and 2 (tests/tiny.py)."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image
from safetensors.torch import load_file
from tokenizers import Tokenizer

from paligemma import lora as L
from paligemma import train as T
from paligemma.__main__ import main
from paligemma.finetune import RUN_JSON, CheckpointWriter, FineTune
from paligemma.parallel import Runner
from paligemma.processor import PaliGemmaProcessor
from paligemma.weights import canonical_key, load_model

SUFFIXES = ["a cat sitting on a bench", "<loc0100><loc0200><loc0500><loc0700> dog",
            "two dogs play in the snow",
            "<loc0010><loc0020><loc0900><loc0400> cat ; <loc0300><loc0500><loc0800><loc1000> dog"]
PREFIXES = ["caption en", "detect dog", "caption en", "detect cat ; dog"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 records (captions and detections, suffixes of different lengths) in train.jsonl, and one without a suffix."""
    folder = tmp_path_factory.mktemp("jsonl")
    lines = []
    for i in range(8):
        random_image(i, 40 + i, 30).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prefix": PREFIXES[i % 4], "suffix": SUFFIXES[i % 4]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "no_suffix.jsonl").write_text(lines[0] + "\n" + json.dumps({"image": "1.png", "prefix": "caption en"}))
    return folder


def cli(*argv: str) -> tuple[int, str]:
    """`python -m paligemma train ...` in this process: (exit code, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--no-progress", *argv])
    return code, out.getvalue()


def batch_of(folder, model, rows=4):
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    processor = PaliGemmaProcessor(tokenizer, model.config)
    return T.training_batch(processor, [random_image(20 + i, 50, 40) for i in range(rows)], PREFIXES[:rows],
                            SUFFIXES[:rows])


def logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["token_type_ids"])


def reference_logits(reference, batch):
    with torch.no_grad():
        return reference(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).logits


def weights(folder) -> dict:
    return {canonical_key(k): v for k, v in load_file(str(folder / "model.safetensors")).items()}


def assert_same_weights(a, b, atol):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


# ---- LoRA against its merge and against peft ----------------------------------------------------


@pytest.mark.parametrize("variant,layers", [("pg1", None), ("pg2", None), ("pg1", (0, 2))])
def test_lora_is_a_no_op_when_fresh_its_merge_equals_it_and_peft_reads_it(variant, layers, reference_factory,
                                                                          tmp_path):
    """A fresh adapter leaves the logits unchanged; with B trained (random here), the merged checkpoint gives the
    adapted model's logits (1e-5), and the adapter saved in PEFT's layout, loaded by peft onto transformers'
    PaliGemma, gives them too (1e-4). With a subset of the decoder's layers, peft adapts those layers only."""
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration as Reference

    folder, _ = reference_factory(variant)
    model = load_model(folder, dtype=torch.float32)
    batch = batch_of(folder, model)
    keep = batch["attention_mask"].bool()
    before = logits(model, batch)
    finetune = FineTune(parts=("projector",), lora=L.LoraSpec(r=4, alpha=8.0, vision=True, layers=layers))
    torch.manual_seed(0)
    trained = finetune.prepare(model)
    decoder = {int(n.split(".")[3]) for n in L.lora_modules(model) if n.startswith("language_model.")}
    assert decoder == set(layers or range(model.config.text.num_hidden_layers))
    assert torch.equal(logits(model, batch), before)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name or name.startswith("multi_modal_projector"):
                p.add_(torch.randn_like(p) * 0.05)
    adapted = logits(model, batch)
    assert (adapted[keep] - before[keep]).abs().max() > 1e-2  # the adapters and the projector change the answer
    out = tmp_path / "merged"
    writer = CheckpointWriter(Runner(model), finetune, trained, folder, torch.float32,
                              Tokenizer.from_file(str(folder / "tokenizer.json")), base_name=str(folder))
    writer(out)
    merged = load_model(out, dtype=torch.float32)
    torch.testing.assert_close(logits(merged, batch)[keep], adapted[keep], rtol=0, atol=1e-5)
    # peft adapts the model it is given in place: a fresh one, not the factory's shared reference.
    peft_model = PeftModel.from_pretrained(Reference.from_pretrained(folder), out / "adapter").eval()
    torch.testing.assert_close(reference_logits(peft_model, batch)[keep], adapted[keep], rtol=0, atol=1e-4)
    theirs = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
              if hasattr(module, "lora_A") and not name.endswith(".lora_A")}
    assert theirs == {L.transformers_name(name) for name in L.lora_modules(model)}


def test_distillation_is_the_kl_from_the_base_model_on_the_marked_rows_only(reference_factory):
    """--distill W adds W x KL(base || adapted) over the suffix tokens of the rows marked "distill", the base being
    the model with its adapters off: zero while the adapters are fresh, and with them trained (random here) the KL
    computed from a separately loaded base model's logits."""
    folder, _ = reference_factory("pg1")
    model, base = load_model(folder, dtype=torch.float32), load_model(folder, dtype=torch.float32)
    batch = batch_of(folder, model)
    batch["distill"] = torch.tensor([True, False, True, False])
    FineTune(parts=(), lora=L.LoraSpec(r=4, alpha=8.0)).prepare(model)
    plain, distilled = T.lm_loss(), T.lm_loss(distill=0.5)
    assert distilled(model, batch)[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    loss, shown = distilled(model, batch)
    keep = batch["labels"][:, 1:] != T.IGNORE
    keep[[1, 3]] = False
    theirs = torch.log_softmax(logits(base, batch)[:, :-1][keep], -1)
    ours = torch.log_softmax(logits(model, batch)[:, :-1][keep], -1)
    expected = (theirs.exp() * (theirs - ours)).sum(-1).mean()
    assert expected > 1e-3
    torch.testing.assert_close(torch.tensor(shown["kl"]), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, plain(model, batch)[0] + 0.5 * expected, rtol=1e-5, atol=1e-6)
    assert all(m.enabled for m in L.lora_modules(model).values())  # the adapters are back on


def test_lora_targets_hugging_faces_parameter_count_at_the_3b_shape():
    """r = 8 on q, k, v, o, gate, up, down with the vision tower: 11,298,816 parameters (Hugging Face's PaliGemma
    recipe, REFERENCE.md); big_vision's colab trains the attention layers: about 170 M."""
    from bench.workloads import PALIGEMMA_3B, config_dict
    from paligemma.config import PaliGemmaConfig
    from paligemma.model import PaliGemmaForConditionalGeneration

    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(config_dict(PALIGEMMA_3B, 27, 18)))
        FineTune(parts=(), lora=L.LoraSpec(r=8, alpha=16, vision=True)).prepare(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 11_298_816
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_dict(config_dict(PALIGEMMA_3B, 27, 18)))
        FineTune(parts=("attention",)).prepare(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 18 * (2 * 2048 * 2048 + 2 * 2048 * 256)


# ---- what trains, checkpointing, accumulation ---------------------------------------------------


def test_frozen_parameters_do_not_move_get_no_gradient_and_stay_bfloat16(reference_factory):
    folder, _ = reference_factory("pg1")
    model = load_model(folder, dtype=torch.bfloat16)
    trained = set(FineTune(parts=("attention",), dtype=torch.bfloat16).prepare(model))
    assert trained and all(".self_attn." in n and n.startswith("language_model.") for n in trained)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = batch_of(folder, model)
    T.train(model, lambda step: batch, T.lm_loss(), T.TrainOptions(steps=2, lr=1e-2, warmup=1, progress=False,
                                                                  autocast=torch.bfloat16), log=lambda line: None)
    for name, p in model.named_parameters():
        if name in trained:
            assert p.dtype == torch.float32 and p.grad is not None and not torch.equal(p, before[name]), name
        else:
            assert p.dtype == torch.bfloat16 and p.grad is None and torch.equal(p, before[name]), name


def test_checkpointing_gives_the_same_gradients(reference_factory):
    folder, _ = reference_factory("pg2")
    model = load_model(folder, dtype=torch.float32).train()
    batch = batch_of(folder, model)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.language_model.model.checkpointing = model.vision_tower.vision_model.encoder.checkpointing = checkpointing
        T.lm_loss()(model, batch)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("per_record", [False, True])
def test_gradient_accumulation_over_2_x_2_equals_one_batch_of_4(per_record, reference_factory):
    """Micro-batches weigh their mean loss by their share of the batch's labelled tokens (of its records under
    --loss-average record): 2 x 2 rows give the weights of one batch of 4 (SGD: the weights move by the gradient
    itself), where the mean of the micro-batches' means (their suffixes have different lengths) would not."""
    folder, _ = reference_factory("pg1")
    batch = batch_of(folder, load_model(folder, dtype=torch.float32))
    if per_record:
        batch["label_weights"] = T.record_weights(batch["labels"])
    results = []
    for accum in (1, 2):
        # float64: the sums of micro-batches round apart from the batch's by ~1e-6 in float32 at this learning rate
        model = load_model(folder, dtype=torch.float64)
        T.train(model, lambda step: batch, T.lm_loss(), T.TrainOptions(
            steps=2, lr=0.5, warmup=1, clip_norm=1e9, optimizer="sgd", grad_accum=accum, progress=False),
            log=lambda line: None)
        results.append(dict(model.named_parameters()))
    for name, p in results[0].items():
        torch.testing.assert_close(results[1][name], p, rtol=0, atol=1e-6, msg=name)
    halves = T.micro_batches(batch, 2)
    model = load_model(folder, dtype=torch.float32)
    whole = T.lm_loss()(model, batch)[0]
    mean_of_means = sum(T.lm_loss()(model, half)[0] for half in halves) / 2
    if per_record:  # the mean over the records of each one's mean token loss
        rows = logits(model, batch)
        per_row = [T.suffix_loss(rows[i : i + 1], batch["labels"][i : i + 1]) for i in range(len(rows))]
        torch.testing.assert_close(whole, sum(per_row) / len(per_row), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(whole, mean_of_means, rtol=1e-5, atol=1e-6)  # the halves hold 2 records each
    else:
        assert abs(whole.item() - mean_of_means.item()) > 1e-3


# ---- one LoRA run through the command: merged checkpoint, adapter, resume, scores, export --------


@pytest.fixture(scope="module")
def lora_run(reference_factory, data, tmp_path_factory):
    """LoRA r = 4 on the decoder and the vision tower, the projector trained in full, frozen weights in bfloat16,
    checkpointing, 2 micro-batches; evaluated by generation; exported at the end."""
    folder, _ = reference_factory("pg1")
    out = tmp_path_factory.mktemp("lora_run")
    common = ["--model", str(folder), "--data", str(data / "train.jsonl"), "--batch-size", "4", "--lr", "1e-2",
              "--warmup", "1", "--save-every", "2", "--lora", "4", "--lora-vision", "--train", "projector",
              "--dtype", "bfloat16", "--checkpointing", "--grad-accum", "2"]
    code, printed = cli(*common, "--out", str(out / "run"), "--steps", "3", "--eval-data", str(data / "train.jsonl"),
                        "--eval-every", "3", "--export", str(out / "onnx"))
    assert code == 0, printed
    return folder, out, common, printed


def test_lora_run_writes_the_merged_model_in_the_base_dtype_and_the_adapter_in_peft_layout(lora_run):
    base, out, _, _ = lora_run
    last = out / "run" / "last"
    assert sorted(p.name for p in (out / "run").iterdir()) == ["last", "step-000002", "step-000003"]
    assert json.loads((last / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name for p in (last / "adapter").iterdir()) == [L.ADAPTER_CONFIG, L.ADAPTER_WEIGHTS]
    assert json.loads((last / RUN_JSON).read_text())["finetune"]["dtype"] == "bfloat16"
    merged, original = weights(last), weights(base)
    assert all(v.dtype == torch.float32 for v in merged.values())
    frozen = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert torch.equal(merged[frozen], original[frozen])  # read back from the base, not the bfloat16 working copy
    adapted = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[adapted], original[adapted])


def test_lora_adapter_loads_in_peft_and_gives_the_merged_models_logits(lora_run):
    from peft import PeftModel
    from transformers import PaliGemmaForConditionalGeneration as Reference

    base, out, _, _ = lora_run
    merged = load_model(out / "run" / "last", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(Reference.from_pretrained(base), out / "run" / "last" / "adapter").eval()
    batch = batch_of(base, merged)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(reference_logits(peft_model, batch)[keep], logits(merged, batch)[keep], rtol=0,
                               atol=1e-4)


def test_a_resumed_lora_run_equals_the_uninterrupted_one(lora_run):
    _, out, common, _ = lora_run
    code, printed = cli(*common, "--out", str(out / "resumed"), "--steps", "3",
                        "--resume", str(out / "run" / "step-000002"))
    assert code == 0 and "at step 2" in printed
    assert_same_weights(out / "resumed" / "last", out / "run" / "last", atol=1e-6)
    straight = load_file(str(out / "run" / "last" / "adapter" / L.ADAPTER_WEIGHTS))
    resumed = load_file(str(out / "resumed" / "last" / "adapter" / L.ADAPTER_WEIGHTS))
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


def test_generated_scores_are_reported_and_the_export_validates(lora_run):
    _, out, _, printed = lora_run
    line = next(line for line in printed.splitlines() if line.startswith("eval step 3: "))
    scores = json.loads(line.removeprefix("eval step 3: "))
    assert {"eval_loss", "exact_match", "box_iou"} <= scores.keys()
    assert 0.0 <= scores["exact_match"] <= 1.0 and 0.0 <= scores["box_iou"] <= 1.0
    assert "exported and validated" in printed and (out / "onnx").is_dir() and any((out / "onnx").iterdir())


def test_detection_iou_matches_boxes_by_label():
    truth = "<loc0000><loc0000><loc0511><loc0511> cat ; <loc0512><loc0512><loc1023><loc1023> dog"
    assert T.detection_iou(truth, truth, 100, 100) == (pytest.approx(2.0), 2)
    swapped = "<loc0000><loc0000><loc0511><loc0511> dog ; <loc0512><loc0512><loc1023><loc1023> cat"
    assert T.detection_iou(truth, swapped, 100, 100) == (0.0, 2)
    half = "<loc0000><loc0000><loc0511><loc0255> cat"  # half the cat's box, and no dog
    total, count = T.detection_iou(truth, half, 100, 100)
    assert count == 2 and total == pytest.approx(0.5, abs=0.01)


# ---- torchrun: two gloo processes ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_as_one_and_resume(mode, reference_factory, data, tmp_path):
    """torchrun with two gloo processes gives the weights of one process over the same global batch (1e-6 after 3
    steps), prints progress once and writes one checkpoint, which a one-process run resumes from. DDP for LoRA (and
    the projector), FSDP2 for full fine-tuning. SGD without clipping: the weights then move by the gradients
    themselves; Adam divides each gradient by its running RMS (+1e-8), which turns rounding noise in gradients that are
    zero in exact arithmetic (SigLIP's key bias: softmax ignores a per-query constant) into lr-sized steps, and a
    clip factor computed from a sharded norm differs in its last bits."""
    folder, _ = reference_factory("pg1")
    what = ["--lora", "4", "--lora-vision", "--train", "projector"] if mode == "ddp" else []
    common = ["--model", str(folder), "--data", str(data / "train.jsonl"), "--batch-size", "4", "--lr", "0.05",
              "--warmup", "1", "--optimizer", "sgd", "--clip-norm", "1e9", "--save-every", "2", "--steps", "3", *what]
    code, _ = cli(*common, "--out", str(tmp_path / "one"))
    assert code == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "paligemma",
                           "train", "--no-progress", *common, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout and done.stdout.count("step 3 loss") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["last", "step-000002", "step-000003"]
    assert_same_weights(tmp_path / "two" / "last", tmp_path / "one" / "last", atol=1e-6)
    code, printed = cli(*common, "--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "two" / "step-000002"))
    assert code == 0 and "at step 2" in printed
    assert_same_weights(tmp_path / "resumed" / "last", tmp_path / "one" / "last", atol=1e-6)


def test_fsdp_optimizer_moments_are_gathered_and_restored(reference_factory, tmp_path):
    """Under FSDP2 (here over one gloo process) the AdamW moments written are the unsharded ones, under the model's
    names, and loading them into a fresh sharded optimizer continues exactly as the plain model does."""
    import torch.distributed as dist

    from paligemma.parallel import fully_sharded

    folder, _ = reference_factory("pg1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain = load_model(folder, dtype=torch.float32)
        batch = batch_of(folder, plain)
        options = T.TrainOptions(steps=1, lr=1e-3, warmup=1, progress=False)
        T.train(plain, lambda step: batch, T.lm_loss(), options, out_dir=tmp_path / "plain",
                save=lambda d: None, log=lambda line: None)
        sharded = fully_sharded(Runner(load_model(folder, dtype=torch.float32)), "cpu", 1)
        T.train(sharded, lambda step: batch, T.lm_loss(), options, out_dir=tmp_path / "sharded",
                save=lambda d: None, log=lambda line: None)
        for name in ("step-000001/" + T.STATE_TENSORS,):
            a, b = load_file(str(tmp_path / "plain" / name)), load_file(str(tmp_path / "sharded" / name))
            assert a.keys() == b.keys() and len(a) > 10
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
        again = T.TrainOptions(steps=2, lr=1e-3, warmup=1, progress=False)
        # Each continues from its own weights after step 1 (equal, by the moments' equality) with a fresh
        # optimizer that reads the moments back.
        T.train(sharded, lambda step: batch, T.lm_loss(), again, resume=tmp_path / "sharded" / "step-000001",
                log=lambda line: None)
        T.train(plain, lambda step: batch, T.lm_loss(), again, resume=tmp_path / "plain" / "step-000001",
                log=lambda line: None)
        for (name, p), (_, q) in zip(sharded.model.named_parameters(), plain.named_parameters()):
            torch.testing.assert_close(p.full_tensor(), q, rtol=0, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


# ---- bad input: one line, before any step --------------------------------------------------------


@pytest.mark.parametrize("case", ["target", "layer", "layer_text", "distill", "nothing", "lora_all", "no_suffix",
                                  "world"])
def test_bad_input_is_one_line_before_any_step(case, reference_factory, data, tmp_path, capsys, monkeypatch):
    folder, _ = reference_factory("pg1")
    args = ["--model", str(folder), "--data", str(data / "train.jsonl"), "--out", str(tmp_path / "out"),
            "--batch-size", "4", "--steps", "2"]
    expected = {
        "target": (["--lora", "4", "--lora-targets", "q,qq"], "--lora-targets qq names no module"),
        "layer": (["--lora", "4", "--lora-layers", "1-3"], "--lora-layers 3: this model's decoder has layers 0 to 2"),
        "layer_text": (["--lora", "4", "--lora-layers", "a"], "--lora-layers a: give decoder layer indices"),
        "distill": (["--distill", "1"], "--distill 1: give a weight of 0 or more, with --lora R"),
        "nothing": (["--train", ""], "--train names nothing to train"),
        "lora_all": (["--lora", "4", "--train", "all"], "--lora with --train all"),
        "no_suffix": (["--data", str(data / "no_suffix.jsonl")], "no_suffix.jsonl:2: missing suffix"),
        "world": (["--batch-size", "3"], "--batch-size 3 does not split over 2 process(es)"),
    }[case]
    if case == "world":
        monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["train", "--no-progress", *args, *expected[0]])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and expected[1] in err, err
    assert not (tmp_path / "out").exists()
