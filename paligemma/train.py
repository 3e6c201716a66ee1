"""Fine-tuning PaliGemma: prefix-LM inputs, loss on the suffix only, AdamW with warm-up and cosine decay.

    python -m paligemma train --model CKPT_DIR --data train.jsonl --out OUT_DIR [--steps N ...]
    python -m paligemma train --config config.json --tokenizer tokenizer.json --data train.jsonl --out OUT_DIR

Each JSONL line is {"image": path, "prefix": "caption en", "suffix": "a red circle"}; a relative image path
is read from the JSONL's folder. A training sequence is

    <image> x N  <bos>  prefix "\\n"  |  suffix <eos>       token_type_ids 0 ... 0 | 1 ... 1

with full attention over the part left of the bar and causal attention over the rest; only the suffix
tokens (and the final <eos>) are labels, everything else (image, prompt, padding) is -100.

Checkpoints are written to OUT_DIR/step-NNNNNN and OUT_DIR/last in the Hugging Face layout (config.json,
model.safetensors, tokenizer.json), with training_state.safetensors + training_state.json beside them
(optimizer moments, step): `--resume OUT_DIR/last` continues from the same step with the same data order.
No pickles are written or read.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.data
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .locations import loc_range_of
from .processor import PaliGemmaProcessor

IGNORE = -100
STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


# ---- inputs -------------------------------------------------------------------------------------


def training_batch(processor, images, prefixes: list[str], suffixes: list[str]) -> dict[str, torch.Tensor]:
    """The processor's inputs (left-padded input_ids, attention_mask, token_type_ids, pixel_values) plus labels.

    labels[t] is the token at t where t is in the suffix (its words and the final <eos>), else -100 (image,
    prompt, padding); the loss compares the logits at t - 1 with labels[t]."""
    batch = processor(images, prefixes, suffixes)
    prefix_or_padding = (batch["token_type_ids"] == 0) | (batch["attention_mask"] == 0)
    batch["labels"] = batch["input_ids"].masked_fill(prefix_or_padding, IGNORE)
    return batch


# ---- loss ---------------------------------------------------------------------------------------


def suffix_loss(
    logits: torch.Tensor, labels: torch.Tensor, loc_range: tuple[int, int] | None = None, loc_sigma: float = 0.0
) -> torch.Tensor:
    """Mean cross-entropy of the suffix labels, the logits at t - 1 predicting labels[t]; -100 is ignored.
    See token_loss for `loc_range` and `loc_sigma`."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return token_loss(logits[:, :-1][keep], targets[keep], loc_range, loc_sigma)


def labelled_loss(
    model, hidden: torch.Tensor, labels: torch.Tensor, loc_range: tuple[int, int] | None = None, loc_sigma: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """suffix_loss from the decoder's hidden states [B, T, C], projected to logits only where there is a label
    (a real PaliGemma's 257k-entry vocabulary would otherwise take T x 257k floats per sequence, mostly for the
    image tokens). `weights` [B, T], if given, weighs each label (see token_loss)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    kept_weights = None if weights is None else weights[:, 1:][keep]
    return token_loss(model.decoder.logits(hidden[:, :-1][keep]), targets[keep], loc_range, loc_sigma, kept_weights)


def soft_bin_targets(bins: torch.Tensor, count: int, sigma: float) -> torch.Tensor:
    """[M, count] distributions: a Gaussian of standard deviation `sigma` bins around each target bin [M]."""
    grid = torch.arange(count, device=bins.device, dtype=torch.float32)
    soft = torch.exp(-0.5 * ((grid - bins.float()[:, None]) / sigma) ** 2)
    return soft / soft.sum(-1, keepdim=True)


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, loc_range: tuple[int, int] | None = None, loc_sigma: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of logits [M, V] against target ids [M] (weighted by `weights` [M] if given).

    Computed in float32 with log_softmax (stable for any logit scale). With `loc_range` = (first loc id,
    number of loc tokens) and loc_sigma > 0, a loc label's target is a Gaussian over the neighbouring bins
    (standard deviation loc_sigma bins) instead of a single bin.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)  # [M, V]
    nll = -log_probs.gather(1, targets[:, None])[:, 0]
    if loc_range is not None and loc_sigma > 0:
        first, count = loc_range
        is_loc = (targets >= first) & (targets < first + count)
        if is_loc.any():
            soft = soft_bin_targets(targets[is_loc] - first, count, loc_sigma)
            nll = nll.clone()
            nll[is_loc] = -(soft * log_probs[is_loc, first : first + count]).sum(-1)
    if weights is None:
        return nll.mean()
    return (nll * weights).sum() / weights.sum()


# ---- schedule, optimizer ------------------------------------------------------------------------


def learning_rate(step: int, total: int, peak: float, warmup: int, final_ratio: float = 0.02) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to peak * final_ratio at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices and embeddings only (not on biases and norm scales)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )


# ---- checkpoints and resume ---------------------------------------------------------------------


def save_training_state(directory: Path, step: int, optimizer: torch.optim.Optimizer,
                        extra_modules: dict[str, torch.nn.Module]):
    """Optimizer moments and the weights of `extra_modules` (e.g. auxiliary heads) as safetensors, the step as JSON."""
    tensors = {f"extra.{name}.{k}": v.detach().contiguous().cpu()
               for name, module in extra_modules.items() for k, v in module.state_dict().items()}
    scalars = {}
    for i, (param, state) in enumerate(_param_states(optimizer)):
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"optimizer.{i}.{key}"] = value.contiguous().cpu()
            else:
                scalars[f"{i}.{key}"] = float(value)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "optimizer_scalars": scalars}, indent=1))


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> int:
    """The step saved by save_training_state; fills the optimizer's moments in place."""
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    scalars = meta["optimizer_scalars"]
    for i, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        state = {}
        for key, value in tensors.items():
            if key.startswith(f"optimizer.{i}."):
                state[key.rsplit(".", 1)[1]] = value.to(param.device)
        for key, value in scalars.items():
            index, name = key.split(".", 1)
            if int(index) == i:
                state[name] = torch.tensor(value)
        if state:
            optimizer.state[param] = state
    return meta["step"]


def load_extra_modules(directory: Path, modules: dict[str, torch.nn.Module]):
    """Each module's weights as save_training_state wrote them under its name."""
    tensors = load_file(str(directory / STATE_TENSORS))
    for name, module in modules.items():
        prefix = f"extra.{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def _param_states(optimizer):
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p, optimizer.state.get(p, {})


@dataclass(frozen=True)
class Checkpoints:
    """OUT_DIR/step-NNNNNN, and OUT_DIR/last a copy of the latest: the model as `save(directory)` writes it, with
    the optimizer moments and `extra_modules` (trained, not part of the model) beside it."""

    out_dir: Path
    save: Callable[[Path], None]
    optimizer: torch.optim.Optimizer
    extra_modules: dict[str, torch.nn.Module]

    def write(self, step: int):
        directory = self.out_dir / f"step-{step:06d}"
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory)
        save_training_state(directory, step, self.optimizer, self.extra_modules)
        # `last` is replaced only once complete, so an interruption never leaves a half-written checkpoint there.
        staging = self.out_dir / "last.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(directory, staging)
        shutil.rmtree(self.out_dir / "last", ignore_errors=True)
        staging.rename(self.out_dir / "last")


# ---- batches ------------------------------------------------------------------------------------


def default_workers(device: str) -> int:
    """Batch-making processes: on a GPU, all cores but one (at most 8); on a CPU none, since the step's matrix work
    already uses every core (measured on 2 cores: one worker made shapes.train 5% slower)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1)) if torch.device(device).type == "cuda" else 0


class StepBatches(torch.utils.data.Dataset):
    """Steps start .. stop - 1 of `batches(step)` as a dataset, for a DataLoader's worker processes."""

    def __init__(self, batches: Callable[[int], dict], start: int, stop: int):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict:
        return self.batches(self.start + index)


def batch_stream(batches: Callable[[int], dict], start: int, stop: int, workers: int, device: torch.device):
    """The batches of steps start .. stop - 1 in order, on `device`. With workers, they are made in that many
    processes ahead of the step that needs them (a batch is a pure function of its step, so which process makes it
    changes nothing): on a GPU, making a batch can take longer than training on it."""
    if workers:
        # fork: the batch function (often a closure) needs no pickling; the workers only draw and never touch a GPU.
        loader = torch.utils.data.DataLoader(StepBatches(batches, start, stop), batch_size=None, shuffle=False,
                                             num_workers=workers, prefetch_factor=2, multiprocessing_context="fork",
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator())  # its seed draw leaves torch's own RNG alone
        stream = iter(loader)
    else:
        stream = (batches(step) for step in range(start, stop))
    for batch in stream:
        yield to_device(batch, device)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ---- the loop -----------------------------------------------------------------------------------


@dataclass
class TrainOptions:
    steps: int
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    progress: bool = True
    workers: int = 0  # processes that make the next batches while a step trains (0: made between steps)


def train_step(model, loss_fn, batch: dict, optimizer, params, lr: float, clip_norm: float):
    """One optimizer step at learning rate `lr`; returns (loss, loss_fn's named floats, gradient norm before
    clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, shown = loss_fn(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return loss.item(), shown, grad_norm


class Progress:
    """The smoothed loss on a progress bar, and a log line every 50 steps and at the last."""

    def __init__(self, total: int, start: int, show_bar: bool, log: Callable[[str], None]):
        self.total, self.log = total, log
        self.bar = None
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, mininterval=2.0)
        self.smoothed = None
        self.started = time.time()

    def update(self, done: int, loss: float, lr: float, grad_norm: torch.Tensor, shown: dict):
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss
        if self.bar is not None:
            shown_text = {k: f"{v:.3f}" for k, v in shown.items()}
            self.bar.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{lr:.2e}", **shown_text)
            self.bar.update(1)
        if done % 50 == 0 or done == self.total:
            details = " ".join(f"{k} {v:.4f}" for k, v in shown.items())
            self.log(f"step {done} loss {self.smoothed:.4f} grad_norm {grad_norm:.3f} lr {lr:.2e} {details} "
                     f"elapsed {time.time() - self.started:.0f}s")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def evaluation(model: torch.nn.Module, evaluate: Callable[[int], dict], step: int) -> dict:
    """`evaluate(step)` with the model in eval mode and no gradients, then back in training mode."""
    model.eval()
    with torch.no_grad():
        metrics = evaluate(step)
    model.train()
    return metrics


def train(
    model: torch.nn.Module,
    batches: Callable[[int], dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    options: TrainOptions,
    out_dir: Path | None = None,
    save: Callable[[Path], None] | None = None,
    evaluate: Callable[[int], dict] | None = None,
    resume: Path | None = None,
    extra_modules: dict[str, torch.nn.Module] | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Runs steps start .. options.steps - 1; returns the last step done + 1.

    `batches(step)` gives the batch of a step on the CPU (a pure function of the step, so a resumed run sees the
    same data; `options.workers` processes make them ahead), moved here to the model's device; `loss_fn(model,
    batch)` gives (loss, named floats to show). `save(directory)` writes the model checkpoint; the optimizer moments
    and `extra_modules` (trained, not part of the checkpoint) go beside it.
    """
    torch.manual_seed(options.seed)
    extra_modules = extra_modules or {}
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for m in extra_modules.values() for p in m.parameters()]
    optimizer = adamw(params, options.lr, options.weight_decay)
    start = 0
    if resume is not None:
        start = load_training_state(Path(resume), optimizer)
        load_extra_modules(Path(resume), extra_modules)
        log(f"resumed from {resume} at step {start}")
    checkpoints = None if out_dir is None or save is None else Checkpoints(out_dir, save, optimizer, extra_modules)
    progress = Progress(options.steps, start, options.progress, log)
    model.train()
    stream = batch_stream(batches, start, options.steps, options.workers, next(model.parameters()).device)
    for step, batch in zip(range(start, options.steps), stream):
        lr = learning_rate(step, options.steps, options.lr, options.warmup)
        loss, shown, grad_norm = train_step(model, loss_fn, batch, optimizer, params, lr, options.clip_norm)
        done = step + 1
        progress.update(done, loss, lr, grad_norm, shown)
        if evaluate is not None and options.eval_every and done % options.eval_every == 0:
            log(f"eval step {done}: " + json.dumps(evaluation(model, evaluate, done)))
        if checkpoints is not None and (options.save_every and done % options.save_every == 0 or done == options.steps):
            checkpoints.write(done)
    stream.close()  # ends the worker processes
    progress.close()
    model.eval()
    return options.steps


# ---- JSONL fine-tuning --------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
        missing = [k for k in ("image", "prefix", "suffix") if k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)}; each line needs image, prefix and suffix")
        image = Path(record["image"])
        record["image"] = image if image.is_absolute() else Path(path).parent / image
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def jsonl_batches(records: list[dict], processor, batch_size: int, seed: int):
    """batches(step): an epoch-wise shuffle fixed by the seed, so the batch of a step never depends on history."""

    def batches(step: int) -> dict:
        per_epoch = max(1, len(records) // batch_size)
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(records)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        chosen = [records[i] for i in order[index * batch_size : (index + 1) * batch_size]]
        return training_batch(processor, [r["image"] for r in chosen], [r["prefix"] for r in chosen],
                              [r["suffix"] for r in chosen])

    return batches


def lm_loss(loc_range=None, loc_sigma=0.0):
    """The plain objective: suffix cross-entropy of the model's logits."""

    def loss_fn(model, batch):
        hidden = model.hidden_states(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                     batch["token_type_ids"])
        return labelled_loss(model, hidden, batch["labels"], loc_range, loc_sigma), {}

    return loss_fn


def init_weights(model: torch.nn.Module, std: float = 0.02):
    """A fresh model: normal(0, std) matrices and embeddings, zero biases, LayerNorm scale 1, RMSNorm offset 0."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=std)
        elif name.startswith("vision_tower") and "norm" in name and name.endswith("weight"):
            torch.nn.init.ones_(p)  # SigLIP's LayerNorm scales; Gemma's RMSNorm stores an offset from 1
        else:
            torch.nn.init.zeros_(p)


def add_train_arguments(parser):
    parser.add_argument("--model",
                        help="checkpoint folder to fine-tune (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--config", help="config.json of a fresh model to train from scratch (with --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one in --model)")
    parser.add_argument("--data", required=True, help="JSONL of {image, prefix, suffix} records")
    parser.add_argument("--eval-data", help="JSONL held out for the periodic evaluation (suffix loss)")
    parser.add_argument("--out", required=True, help="folder for checkpoints")
    parser.add_argument("--resume", help="a checkpoint folder written by this command (e.g. OUT/last)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--loc-sigma", type=float, default=0.0,
                        help="soft targets over neighbouring loc bins (in bins)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, help="processes that load the next batches while a step trains "
                                                     "(default: on a GPU cores - 1, at most 8; on a CPU 0)")
    parser.add_argument("--no-progress", action="store_true")


@dataclass(frozen=True)
class HeldOutLoss:
    """train's `evaluate` on held-out records: the mean loss over `count` of their batches."""

    model: torch.nn.Module
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]]
    batches: Callable[[int], dict]
    count: int

    def __call__(self, step: int) -> dict:
        device = next(self.model.parameters()).device
        losses = [self.loss_fn(self.model, to_device(self.batches(i), device))[0].item() for i in range(self.count)]
        return {"eval_loss": sum(losses) / len(losses)}


def save_with_tokenizer(model: torch.nn.Module, tokenizer: Tokenizer, directory: Path):
    """A checkpoint folder: the model's config.json and model.safetensors, and tokenizer.json."""
    from .weights import save_checkpoint

    save_checkpoint(model, directory)
    tokenizer.save(str(Path(directory) / "tokenizer.json"))


def model_to_train(args) -> tuple[torch.nn.Module, Path]:
    """The command's model and the path of its tokenizer.json: a checkpoint (--resume, else --model) or a fresh
    model (--config and --tokenizer)."""
    from .config import PaliGemmaConfig
    from .model import PaliGemmaForConditionalGeneration
    from .weights import load_model

    source = args.resume or args.model
    if source:
        model = load_model(source, device=args.device, dtype=torch.float32)
        return model, Path(args.tokenizer or Path(source) / "tokenizer.json")
    if not args.config:
        raise ValueError("give --model (fine-tune a checkpoint) or --config with --tokenizer (train a fresh model)")
    if not args.tokenizer:
        raise ValueError("--config needs --tokenizer (a tokenizer.json whose ids fit the config's vocabulary)")
    torch.manual_seed(args.seed)
    model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_json_file(args.config))
    init_weights(model)
    return model.to(args.device), Path(args.tokenizer)


def run_train(args):
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 (load batches between steps) or more processes")
    model, tokenizer_path = model_to_train(args)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    processor = PaliGemmaProcessor(tokenizer, model.config)
    batches = jsonl_batches(read_jsonl(Path(args.data)), processor, args.batch_size, args.seed)
    loss_fn = lm_loss(loc_range_of(tokenizer), args.loc_sigma)
    evaluate = None
    if args.eval_data:
        held_out = read_jsonl(Path(args.eval_data))
        evaluate = HeldOutLoss(model, loss_fn, jsonl_batches(held_out, processor, args.batch_size, args.seed),
                               count=max(1, len(held_out) // args.batch_size))
    options = TrainOptions(
        steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, progress=not args.no_progress,
        workers=default_workers(args.device) if args.workers is None else args.workers,
    )
    train(model, batches, loss_fn, options, out_dir=Path(args.out), save=partial(save_with_tokenizer, model, tokenizer),
          evaluate=evaluate, resume=Path(args.resume) if args.resume else None)
