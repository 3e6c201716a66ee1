"""paligemma.train: suffix-only loss, soft loc targets, a loop that learns, exact resume, checkpoints transformers
reads."""

import json
import subprocess
import sys

import pytest
import torch

from paligemma import train as T
from paligemma.config import PaliGemmaConfig
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.processor import PaliGemmaProcessor
from paligemma.weights import load_model, save_checkpoint
from shapes import scenes as S
from shapes.tokenizer import build_shapes_tokenizer


def tiny_config_dict(tokenizer):
    vocab = tokenizer.get_vocab_size()
    return {
        "model_type": "paligemma", "image_token_index": tokenizer.token_to_id("<image>"), "projection_dim": 32,
        "vocab_size": vocab,
        "text_config": {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": vocab,
                        "max_position_embeddings": 128},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "patch_size": 14, "image_size": 28, "vision_use_head": False},
    }


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_shapes_tokenizer()
    config = PaliGemmaConfig.from_dict(tiny_config_dict(tokenizer))
    return tokenizer, config, PaliGemmaProcessor(tokenizer, config)


def fresh_model(config, seed=0):
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    T.init_weights(model, std=0.1)
    return model


def scene_batches(processor, per_step=4, seed=5):
    def batches(step):
        chosen = [S.render_scene(seed, step * per_step + i) for i in range(per_step)]
        prompts = [S.CAPTION_PROMPT if i % 2 else S.detect_prompt(["circle", "square"]) for i in range(per_step)]
        answers = [S.caption(s) if i % 2 else S.detect_answer(s, ["circle", "square"]) for i, s in enumerate(chosen)]
        return T.training_batch(processor, [s.image for s in chosen], prompts, answers)

    return batches


def lm(model, batch):
    return T.lm_loss()(model, batch)[0]


def test_labels_are_exactly_the_suffix_and_eos(setup):
    tokenizer, config, processor = setup
    batch = T.training_batch(processor, [S.render_scene(0, 0).image] * 2, ["caption en", "detect circle"],
                             ["a red circle", ""])
    for row, answer in enumerate(["a red circle", ""]):
        labels = [t for t in batch["labels"][row].tolist() if t != T.IGNORE]
        assert labels == tokenizer.encode(answer).ids + [1]
    assert (batch["labels"][batch["attention_mask"] == 0] == T.IGNORE).all()


def test_loss_ignores_prefix_and_padding_positions(setup):
    """Changing the logits that predict prefix or padding tokens leaves the loss unchanged; a suffix one changes it."""
    _, config, processor = setup
    batch = scene_batches(processor)(0)
    labels = batch["labels"]
    logits = torch.randn(*labels.shape, config.text.vocab_size)
    base = T.suffix_loss(logits, labels)
    predicts_suffix = torch.zeros_like(labels, dtype=torch.bool)
    predicts_suffix[:, :-1] = labels[:, 1:] != T.IGNORE
    changed = logits.clone()
    changed[~predicts_suffix] = torch.randn_like(changed[~predicts_suffix]) * 100
    assert torch.equal(T.suffix_loss(changed, labels), base)
    row, column = predicts_suffix.nonzero()[0].tolist()
    changed[row, column] += torch.randn(config.text.vocab_size)
    assert not torch.equal(T.suffix_loss(changed, labels), base)


def test_padded_batch_loss_equals_rows_alone(setup):
    """Through the model: a left-padded row gives the same per-token losses as the row alone (padding is masked)."""
    _, config, processor = setup
    model = fresh_model(config).eval()
    images = [S.render_scene(1, i).image for i in range(2)]
    prompts, answers = ["caption en", "answer en how many red shapes are there?"], ["a red circle, a red square", "2"]
    with torch.no_grad():
        both = T.training_batch(processor, images, prompts, answers)
        rows = [T.training_batch(processor, images[i : i + 1], prompts[i : i + 1], answers[i : i + 1])
                for i in range(2)]
        counts = [(r["labels"] != T.IGNORE).sum().item() for r in rows]
        alone = sum(lm(model, r).item() * n for r, n in zip(rows, counts)) / sum(counts)
        assert lm(model, both).item() == pytest.approx(alone, rel=1e-5)


def test_loss_from_labelled_positions_equals_the_loss_of_all_logits(setup):
    """Training projects only the labelled positions to logits; the loss must be that of the full forward."""
    tokenizer, config, processor = setup
    model = fresh_model(config).eval()
    batch = scene_batches(processor)(0)
    loc = T.loc_range_of(tokenizer)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["token_type_ids"])
        for sigma in (0.0, 2.0):
            expected = T.suffix_loss(logits, batch["labels"], loc, sigma)
            got = T.lm_loss(loc, sigma)(model, batch)[0]
            assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_loc_targets_reward_near_misses(setup):
    tokenizer, config, _ = setup
    first, count = T.loc_range_of(tokenizer)
    labels = torch.tensor([[T.IGNORE, first + 500]])

    def peaked_at(bin_):
        logits = torch.zeros(1, 2, config.text.vocab_size)
        logits[0, 0, first + bin_] = 10.0
        return logits

    near, far = peaked_at(502), peaked_at(700)
    # hard target: a miss is a miss (equal up to the summation order of the log-sum-exp)
    torch.testing.assert_close(T.suffix_loss(near, labels), T.suffix_loss(far, labels), rtol=1e-6, atol=0)
    assert T.suffix_loss(near, labels, (first, count), 3.0) < T.suffix_loss(far, labels, (first, count), 3.0) - 1
    exact = T.suffix_loss(peaked_at(500), labels, (first, count), 3.0)
    assert exact < T.suffix_loss(near, labels, (first, count), 3.0)


def test_soft_bin_targets_are_gaussians_over_the_bins_cut_at_the_edges():
    bins = torch.tensor([0, 500, 1023])
    soft = T.soft_bin_targets(bins, 1024, 2.0)
    density = torch.distributions.Normal(bins.double()[:, None], 2.0).log_prob(torch.arange(1024.0).double()).exp()
    torch.testing.assert_close(soft.double(), density / density.sum(-1, keepdim=True), rtol=0, atol=1e-7)
    assert soft.argmax(-1).tolist() == [0, 500, 1023] and soft[0, 0] > soft[1, 500]  # the edge keeps its mass


def test_learning_rate_schedule():
    lrs = [T.learning_rate(s, 100, 1e-3, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-4


def test_a_few_steps_lower_the_loss(setup):
    _, config, processor = setup
    model = fresh_model(config)
    batch = scene_batches(processor)(0)
    with torch.no_grad():
        before = lm(model, batch).item()
    T.train(model, lambda step: batch, T.lm_loss(), T.TrainOptions(steps=25, lr=3e-3, warmup=2, progress=False),
            log=lambda line: None)
    with torch.no_grad():
        after = lm(model, batch).item()
    assert after < 0.7 * before


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_continues_from_the_same_step(setup, tmp_path):
    """6 steps straight equal 3 steps, a checkpoint, a fresh process state, and 3 resumed steps."""
    _, config, processor = setup
    batches = scene_batches(processor)
    options = T.TrainOptions(steps=6, lr=2e-3, warmup=2, save_every=3, progress=False)
    straight = fresh_model(config)
    T.train(straight, batches, T.lm_loss(), options, out_dir=tmp_path / "a",
            save=lambda d: save_checkpoint(straight, d), log=lambda line: None)
    interrupted = fresh_model(config)
    T.train(interrupted, batches, T.lm_loss(), T.TrainOptions(steps=6, lr=2e-3, warmup=2, save_every=3, progress=False),
            out_dir=tmp_path / "b", save=lambda d: save_checkpoint(interrupted, d), log=lambda line: None)
    resumed = load_model(tmp_path / "b" / "step-000003", dtype=torch.float32)
    seen = []
    last = T.train(resumed, batches, T.lm_loss(), options, out_dir=tmp_path / "c",
                   save=lambda d: save_checkpoint(resumed, d), resume=tmp_path / "b" / "step-000003", log=seen.append)
    assert last == 6 and "at step 3" in seen[0]
    assert json.loads((tmp_path / "c" / "last" / T.STATE_JSON).read_text())["step"] == 6
    expected = state_of(straight)
    for key, value in state_of(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    # Without the optimizer state the result differs: the test can tell.
    cold = load_model(tmp_path / "b" / "step-000003", dtype=torch.float32)
    (tmp_path / "b" / "step-000003" / T.STATE_JSON).write_text(json.dumps({"step": 3, "optimizer_scalars": {}}))
    from safetensors.torch import save_file

    save_file({}, str(tmp_path / "b" / "step-000003" / T.STATE_TENSORS))
    T.train(cold, batches, T.lm_loss(), options, resume=tmp_path / "b" / "step-000003", log=lambda line: None)
    assert any((v - expected[k]).abs().max() > 1e-4 for k, v in state_of(cold).items())


def test_extra_modules_are_saved_beside_each_checkpoint_and_restored_on_resume(setup, tmp_path):
    """A module trained alongside the model (shapes' auxiliary heads) is in each checkpoint's training state, not in
    the model, and a resumed run continues it from there; `last` is a complete copy of the latest step."""
    _, config, processor = setup
    batches = scene_batches(processor)

    def with_head(head):
        return lambda model, batch: (T.lm_loss()(model, batch)[0] + head(torch.ones(3)).square().sum(), {})

    def run(head, steps, out, resume=None):
        model = fresh_model(config) if resume is None else load_model(resume, dtype=torch.float32)
        T.train(model, batches, with_head(head), T.TrainOptions(steps=steps, lr=1e-2, warmup=1, save_every=1,
                progress=False), out_dir=out, save=lambda d: save_checkpoint(model, d), resume=resume,
                extra_modules={"head": head}, log=lambda line: None)

    torch.manual_seed(1)
    straight, first_half, resumed = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    first_half.load_state_dict(straight.state_dict())
    run(straight, 2, tmp_path / "straight")
    run(first_half, 1, tmp_path / "half")
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["last", "step-000001"]
    T.load_extra_modules(tmp_path / "half" / "last", {"head": resumed})
    torch.testing.assert_close(resumed.state_dict(), first_half.state_dict(), rtol=0, atol=0)
    run(resumed, 2, tmp_path / "resumed", resume=tmp_path / "half" / "last")
    torch.testing.assert_close(resumed.state_dict(), straight.state_dict(), rtol=0, atol=1e-6)
    assert not torch.equal(resumed.weight, first_half.weight)  # the resumed step trained the head


def test_worker_processes_train_exactly_as_the_loop_alone(setup, tmp_path):
    """Batches made ahead by worker processes are the steps' own, in order, from a resumed step too: the weights
    equal those of the loop that makes each batch itself, and a stream that skipped a step would not."""
    _, config, processor = setup
    batches = scene_batches(processor)
    results = {}
    for name, workers, batch_of in [("alone", 0, batches), ("workers", 2, batches),
                                    ("shifted", 0, lambda step: batches(step + 1))]:
        model = fresh_model(config)
        options = T.TrainOptions(steps=3, lr=2e-3, warmup=1, save_every=3, progress=False, workers=workers)
        T.train(model, batch_of, T.lm_loss(), options, out_dir=tmp_path / name,
                save=lambda d, m=model: save_checkpoint(m, d), log=lambda line: None)
        resumed = load_model(tmp_path / name / "last", dtype=torch.float32)
        T.train(resumed, batch_of, T.lm_loss(),
                T.TrainOptions(steps=5, lr=2e-3, warmup=1, progress=False, workers=workers),
                resume=tmp_path / name / "last", log=lambda line: None)
        results[name] = state_of(resumed)
    for key, value in results["workers"].items():
        torch.testing.assert_close(value, results["alone"][key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(v, results["alone"][k]) for k, v in results["shifted"].items())


def test_trained_checkpoint_loads_in_transformers(setup, tmp_path):
    from transformers import PaliGemmaForConditionalGeneration as Reference

    tokenizer, config, processor = setup
    model = fresh_model(config)
    batches = scene_batches(processor)
    T.train(model, batches, T.lm_loss(), T.TrainOptions(steps=3, lr=1e-3, warmup=1, progress=False),
            log=lambda line: None)
    save_checkpoint(model, tmp_path)
    reference = Reference.from_pretrained(tmp_path).eval()
    batch = batches(7)
    with torch.no_grad():
        ours = model.eval()(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["token_type_ids"])
        theirs = reference(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1e-4)


def test_train_command_on_jsonl(setup, tmp_path):
    tokenizer, _, _ = setup
    lines = []
    for i in range(6):
        scene = S.render_scene(9, i)
        scene.image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prefix": "caption en", "suffix": S.caption(scene)}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_dict(tokenizer)))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    common = [sys.executable, "-m", "paligemma", "train", "--data", str(tmp_path / "train.jsonl"),
              "--out", str(tmp_path / "run"), "--batch-size", "3", "--lr", "1e-3", "--no-progress"]
    command = common + ["--config", str(tmp_path / "config.json"), "--tokenizer", str(tmp_path / "tokenizer.json"),
                        "--eval-data", str(tmp_path / "train.jsonl"), "--eval-every", "2", "--steps", "4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "eval step 2" in done.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", T.STATE_TENSORS, T.STATE_JSON):
        assert (tmp_path / "run" / "last" / name).exists()
    resumed = subprocess.run(common + ["--steps", "6", "--resume", str(tmp_path / "run" / "last")],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step 6" in resumed.stdout
    bad = subprocess.run(command[:4] + ["--model", str(tmp_path / "run" / "last"),
                                        "--data", str(tmp_path / "missing.jsonl"),
                                        "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "missing.jsonl" in bad.stderr
