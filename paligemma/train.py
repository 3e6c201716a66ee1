"""Fine-tuning PaliGemma: prefix-LM inputs, loss on the suffix only, AdamW with warm-up and cosine decay.

    python -m paligemma train --model CKPT_DIR --data train.jsonl --out OUT_DIR [--steps N ...]
    python -m paligemma train --config config.json --tokenizer tokenizer.json --data train.jsonl --out OUT_DIR

Each JSONL line is {"image": path, "prefix": "caption en", "suffix": "a red circle"}; a relative image path
is read from the JSONL's folder. A LoRA run with `--distill W` also pulls the model's next-token distributions over
the suffix of each record marked "distill": true toward the base's (the model with its adapters off): W times their
KL divergence, beside the cross-entropy (old tasks replayed while the adapters learn a new one). A training sequence is

    <image> x N  <bos>  prefix "\\n"  |  suffix <eos>       token_type_ids 0 ... 0 | 1 ... 1

with full attention over the part left of the bar and causal attention over the rest; only the suffix
tokens (and the final <eos>) are labels, everything else (image, prompt, padding) is -100.

Checkpoints are written to OUT_DIR/step-NNNNNN and OUT_DIR/last in the Hugging Face layout (config.json,
model.safetensors, tokenizer.json), with training_state.safetensors + training_state.json beside them
(optimizer moments, step): `--resume OUT_DIR/last` continues from the same step with the same data order.
No pickles are written or read.

What trains, in which dtype, LoRA and the merged checkpoint: paligemma/finetune.py and paligemma/lora.py. Under
torchrun the same command trains data-parallel (paligemma/parallel.py): `--batch-size` is the global batch, each
of the N processes trains on batch / N rows of it, in `--grad-accum` micro-batches. docs/fine-tuning.md has the
recipes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.data
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from .locations import loc_range_of
from .parallel import (
    Parallel,
    Runner,
    full_optimizer_state,
    gradient_sync,
    load_optimizer_state,
    unwrap,
)
from .processor import PaliGemmaProcessor, parse_detections

logger = logging.getLogger(__name__)

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


def sgd(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.SGD:
    """Momentum-free SGD, big_vision's low-memory choice (its L4 and T4 configs): no state beside the weights, where
    AdamW keeps two float32 moments per trained weight. Weight decay as adamw's (matrices and embeddings only)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                           lr=lr, momentum=0.0)


OPTIMIZERS = {"adamw": adamw, "sgd": sgd}


# ---- checkpoints and resume ---------------------------------------------------------------------


def save_training_state(directory: Path, step: int, optimizer: torch.optim.Optimizer | list[dict],
                        extra_modules: dict[str, torch.nn.Module]):
    """Optimizer moments (of `optimizer`, or its per-parameter states as parallel.full_optimizer_state gives them)
    and the weights of `extra_modules` (e.g. auxiliary heads) as safetensors, the step as JSON."""
    tensors = {f"extra.{name}.{k}": v.detach().contiguous().cpu()
               for name, module in extra_modules.items() for k, v in module.state_dict().items()}
    states = optimizer if isinstance(optimizer, list) else [state for _, state in _param_states(optimizer)]
    scalars = {}
    for i, state in enumerate(states):
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"optimizer.{i}.{key}"] = value.contiguous().cpu()
            else:
                scalars[f"{i}.{key}"] = float(value)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps({"step": step, "optimizer_scalars": scalars}, indent=1))


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, runner: torch.nn.Module | None = None,
                        names: list[str] | None = None) -> int:
    """The step saved by save_training_state; fills the optimizer's moments in place (sharded, under FSDP, by
    `runner` and the model's `names` of the optimizer's parameters)."""
    meta = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    scalars = meta["optimizer_scalars"]
    count = sum(len(group["params"]) for group in optimizer.param_groups)
    states = [{} for _ in range(count)]
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            states[int(index)][name] = value
    for key, value in scalars.items():
        index, name = key.split(".", 1)
        states[int(index)][name] = torch.tensor(value)
    if runner is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for param, state in zip(params, states):
            if state:
                optimizer.state[param] = {k: v.to(param.device) if v.dim() else v for k, v in state.items()}
    else:
        load_optimizer_state(runner, optimizer, names, states)
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
    the optimizer moments and `extra_modules` (trained, not part of the model) beside it. Under torchrun, `write` is
    called on every process (the state is gathered from all: `runner` and `names` for FSDP) and the main one
    writes."""

    out_dir: Path
    save: Callable[[Path], None]
    optimizer: torch.optim.Optimizer
    extra_modules: dict[str, torch.nn.Module]
    runner: torch.nn.Module | None = None
    names: list[str] | None = None
    parallel: Parallel = Parallel()

    def write(self, step: int):
        directory = self.out_dir / f"step-{step:06d}"
        if self.parallel.is_main:
            directory.mkdir(parents=True, exist_ok=True)
        self.save(directory)
        states = (full_optimizer_state(self.runner, self.optimizer, self.names) if self.runner is not None
                  else self.optimizer)
        if self.parallel.is_main:
            save_training_state(directory, step, states, self.extra_modules)
            # `last` is replaced only once complete, so an interruption never leaves a half-written checkpoint there.
            staging = self.out_dir / "last.partial"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(directory, staging)
            shutil.rmtree(self.out_dir / "last", ignore_errors=True)
            staging.rename(self.out_dir / "last")
        self.parallel.barrier()


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
    grad_accum: int = 1  # micro-batches per step: a step's batch is split into this many, their gradients summed
    optimizer: str = "adamw"  # or "sgd" (see OPTIMIZERS)
    autocast: torch.dtype | None = None  # run the forward under autocast to this dtype (bfloat16 frozen weights)


def label_count(batch: dict) -> float:
    """What a batch's loss is the mean over: its labelled tokens (their weights' sum with `label_weights`: its rows
    under --loss-average record), or (without labels) its rows."""
    if "label_weights" in batch:
        return float(batch["label_weights"][:, 1:].sum())
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != IGNORE).sum())
    return next(v for v in batch.values() if torch.is_tensor(v)).shape[0]


def micro_batches(batch: dict, count: int) -> list[dict]:
    """`batch` split by rows into `count` consecutive micro-batches (tensors whose first axis is the batch's)."""
    if count == 1:
        return [batch]
    rows = batch["input_ids"].shape[0] if "input_ids" in batch else label_count(batch)
    if rows % count:
        raise ValueError(f"a batch of {rows} rows does not split into {count} micro-batches")
    size = rows // count
    return [{k: v[i * size : (i + 1) * size] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v
             for k, v in batch.items()} for i in range(count)]


def run_loss(model, loss_fn, batch):
    """loss_fn(model, batch), through the model's Runner (and DDP or FSDP around it) when it has one."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, (Runner, DistributedDataParallel)):
        return model(loss_fn, batch)
    return loss_fn(model, batch)


def autocast_to(dtype: torch.dtype | None, device: torch.device):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train_step(model, loss_fn, batch: dict, optimizer, params, lr: float, clip_norm: float, *, grad_accum: int = 1,
               parallel: Parallel | None = None, autocast: torch.dtype | None = None):
    """One optimizer step at learning rate `lr` on `batch` (this process's share of the step's global batch) in
    `grad_accum` micro-batches; returns (loss, loss_fn's named floats, gradient norm before clipping).

    Each micro-batch's mean loss is weighed by its share of the labelled tokens of the whole global batch (all
    micro-batches, all processes), so the gradient is that of the global batch's mean loss, however it is split."""
    parallel = parallel or Parallel()
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro = micro_batches(batch, grad_accum)
    counts = [label_count(m) for m in micro]
    total = parallel.sum([float(sum(counts))])[0]
    device = params[0].device if params else torch.device("cpu")
    optimizer.zero_grad(set_to_none=True)
    loss_sum, shown_sum = 0.0, {}
    for i, (part, count) in enumerate(zip(micro, counts)):
        share = count / total
        with gradient_sync(model, i == len(micro) - 1):
            with autocast_to(autocast, device):
                loss, shown = run_loss(model, loss_fn, part)
            (loss * (share * parallel.world) if share * parallel.world != 1 else loss).backward()
        loss_sum += loss.item() * share
        for k, v in shown.items():
            shown_sum[k] = shown_sum.get(k, 0.0) + v * share
    if parallel.distributed:
        reduced = parallel.sum([loss_sum, *shown_sum.values()])
        loss_sum, shown_sum = reduced[0], dict(zip(shown_sum, reduced[1:]))
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    return loss_sum, shown_sum, grad_norm


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


def evaluation(model: torch.nn.Module, evaluate: Callable[[int], dict], step: int,
               autocast: torch.dtype | None = None) -> dict:
    """`evaluate(step)` with the model in eval mode and no gradients (through its Runner, if it has one: under FSDP
    the root's weights are gathered for it), then back in training mode."""
    from torch.nn.parallel import DistributedDataParallel

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), autocast_to(autocast, device):
        if isinstance(model, (Runner, DistributedDataParallel)):
            metrics = model(lambda _: evaluate(step))
        else:
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
    parallel: Parallel | None = None,
) -> int:
    """Runs steps start .. options.steps - 1; returns the last step done + 1.

    `batches(step)` gives the batch of a step on the CPU (a pure function of the step, so a resumed run sees the
    same data; `options.workers` processes make them ahead), moved here to the model's device; `loss_fn(model,
    batch)` gives (loss, named floats to show). `save(directory)` writes the model checkpoint; the optimizer moments
    and `extra_modules` (trained, not part of the checkpoint) go beside it.

    `model` is the model, or under torchrun the Runner that `parallel.wrap` made of it (DDP or FSDP), with
    `parallel` the processes: then `batches(step)` gives this process's share of the global batch, and only the main
    process logs and writes (`save` is called on every one).
    """
    from torch.nn.parallel import DistributedDataParallel

    parallel = parallel or Parallel()
    torch.manual_seed(options.seed)
    extra_modules = extra_modules or {}
    wrapped = isinstance(model, (Runner, DistributedDataParallel))
    inner = unwrap(model) if wrapped else model
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]
    params = [p for _, p in named] + [p for m in extra_modules.values() for p in m.parameters()]
    optimizer = OPTIMIZERS[options.optimizer](params, options.lr, options.weight_decay)
    # The model's names of the optimizer's parameters in its order (that of the saved moments).
    name_of = {id(p): n for n, p in named}
    names = [name_of.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    start = 0
    if resume is not None:
        start = load_training_state(Path(resume), optimizer, model if wrapped else None, names)
        load_extra_modules(Path(resume), extra_modules)
        if parallel.is_main:
            log(f"resumed from {resume} at step {start}")
    checkpoints = None
    if out_dir is not None and save is not None:
        checkpoints = Checkpoints(out_dir, save, optimizer, extra_modules, model if wrapped else None, names, parallel)
    if not parallel.is_main:
        log = _silent
    progress = Progress(options.steps, start, options.progress and parallel.is_main, log)
    model.train()
    device = next(inner.parameters()).device
    stream = batch_stream(batches, start, options.steps, options.workers, device)
    for step, batch in zip(range(start, options.steps), stream):
        lr = learning_rate(step, options.steps, options.lr, options.warmup)
        loss, shown, grad_norm = train_step(model, loss_fn, batch, optimizer, params, lr, options.clip_norm,
                                            grad_accum=options.grad_accum, parallel=parallel,
                                            autocast=options.autocast)
        done = step + 1
        progress.update(done, loss, lr, grad_norm, shown)
        if evaluate is not None and options.eval_every and done % options.eval_every == 0:
            metrics = evaluation(model, evaluate, done, options.autocast)
            log(f"eval step {done}: " + json.dumps(metrics))
        if checkpoints is not None and (options.save_every and done % options.save_every == 0 or done == options.steps):
            checkpoints.write(done)
    stream.close()  # ends the worker processes
    progress.close()
    model.eval()
    return options.steps


def _silent(line: str):
    pass


# ---- JSONL fine-tuning --------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give a JSONL file of {{image, prefix, suffix}} records")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: a record is a JSON object with image, prefix and suffix")
        missing = [k for k in ("image", "prefix", "suffix") if k not in record]
        if missing:
            raise ValueError(f"{path}:{number}: missing {', '.join(missing)}; each line needs image, prefix and suffix")
        wrong = [k for k in ("image", "prefix", "suffix") if not isinstance(record[k], str)]
        if wrong:
            raise ValueError(f"{path}:{number}: {', '.join(wrong)} must be text (a string)")
        if not isinstance(record.get("distill", False), bool):
            raise ValueError(f"{path}:{number}: distill must be true or false")
        image = Path(record["image"])
        record["image"] = image if image.is_absolute() else path.parent / image
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def record_weights(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] label weights under which every row weighs the same: 1 / (the row's labelled tokens) at its labels,
    0 elsewhere; the weighted mean of the token losses is then the mean over rows of each row's mean."""
    labelled = (labels != IGNORE).float()
    return labelled / labelled[:, 1:].sum(-1, keepdim=True).clamp(min=1)


def jsonl_batches(records: list[dict], processor, batch_size: int, seed: int, parallel: Parallel | None = None,
                  per_record: bool = False):
    """batches(step): an epoch-wise shuffle fixed by the seed, so the batch of a step never depends on history. With
    `parallel`, this process's share of the global batch of `batch_size` rows. `per_record`: the batch carries
    record_weights as `label_weights` (every record weighs the same in the loss, however long its suffix)."""

    distilled = any(r.get("distill", False) for r in records)

    def batches(step: int) -> dict:
        per_epoch = max(1, len(records) // batch_size)
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(records)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        chosen = [records[i] for i in order[index * batch_size : (index + 1) * batch_size]]
        if parallel is not None:
            chosen = parallel.share(chosen)
        batch = training_batch(processor, [r["image"] for r in chosen], [r["prefix"] for r in chosen],
                               [r["suffix"] for r in chosen])
        if distilled:
            batch["distill"] = torch.tensor([r.get("distill", False) for r in chosen])
        if per_record:
            batch["label_weights"] = record_weights(batch["labels"])
        return batch

    return batches


def lm_loss(loc_range=None, loc_sigma=0.0, distill: float = 0.0):
    """The plain objective: suffix cross-entropy of the model's logits (weighted by the batch's `label_weights` if it
    has them). With `distill` > 0 (a LoRA model), plus `distill` times distill_loss on the rows marked "distill"."""

    def loss_fn(model, batch):
        input_ids, pixel_values, attention_mask, token_type_ids = (
            batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids"))
        image = model.embed_image(pixel_values) if pixel_values is not None else None
        hidden = model.hidden_states(input_ids, None, attention_mask, token_type_ids, image_embeddings=image)
        loss = labelled_loss(model, hidden, batch["labels"], loc_range, loc_sigma, batch.get("label_weights"))
        rows = batch.get("distill")
        if not distill or rows is None or not rows.any():
            return loss, {}
        inputs = [x[rows] for x in (input_ids, pixel_values, attention_mask, token_type_ids)]
        kl = distill_loss(model, hidden[rows], inputs, batch["labels"][rows],
                          image[rows] if image is not None else None)
        return loss + distill * kl, {"kl": kl.item()}

    return loss_fn


def distill_loss(model, hidden: torch.Tensor, inputs: list[torch.Tensor], labels: torch.Tensor,
                 image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(base || model) of the next-token distributions at the suffix positions of `labels` (those the
    cross-entropy sees), the base being `model` with its adapters off (no second copy: the frozen weights are
    the base's); `hidden` are the adapted model's decoder states for `inputs` (input_ids, pixel_values,
    attention_mask, token_type_ids), `image_embeddings` its image embeddings: the base's too where the vision tower
    and projector hold no adapter, so the vision tower runs once."""
    from .lora import adapters_off, lora_modules

    keep = labels[:, 1:] != IGNORE
    vision_adapted = any("vision_tower" in name or "multi_modal_projector" in name for name in lora_modules(model))
    with torch.no_grad(), adapters_off(model):
        if image_embeddings is not None and not vision_adapted:
            input_ids, _, attention_mask, token_type_ids = inputs
            states = model.hidden_states(input_ids, None, attention_mask, token_type_ids,
                                         image_embeddings=image_embeddings.detach())
        else:
            states = model.hidden_states(*inputs)
        base = F.log_softmax(model.decoder.logits(states[:, :-1][keep]).float(), dim=-1)
    adapted = F.log_softmax(model.decoder.logits(hidden[:, :-1][keep]).float(), dim=-1)
    return F.kl_div(adapted, base, log_target=True, reduction="batchmean")


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
    from .finetune import DTYPES, TRAIN_PARTS
    from .lora import DEFAULT_TARGETS

    parser.add_argument("--model",
                        help="checkpoint folder or Hub repo id to fine-tune (config.json, *.safetensors, "
                             "tokenizer.json)")
    parser.add_argument("--config", help="config.json of a fresh model to train from scratch (with --tokenizer)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one in --model)")
    parser.add_argument("--data", required=True, help="JSONL of {image, prefix, suffix} records")
    parser.add_argument("--eval-data", help="JSONL held out for the periodic evaluation: the suffix loss, and the "
                                            "greedy answers' exact match (and box IoU where the suffix holds boxes)")
    parser.add_argument("--out", required=True, help="folder for checkpoints")
    parser.add_argument("--resume", help="a checkpoint folder written by this command (e.g. OUT/last)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="the global batch: over every process under torchrun, over every micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per step (batch-size / processes / grad-accum rows each)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                        help="adamw (two float32 moments per trained weight) or sgd (momentum-free, no state)")
    parser.add_argument("--train", default=None,
                        help=f"parts trained in full, comma-separated: {', '.join(TRAIN_PARTS)} "
                             "(default: all; with --lora: none)")
    parser.add_argument("--lora", type=int, metavar="R", help="train LoRA adapters of rank R (the rest frozen)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA scale alpha / R (default alpha = 2 R)")
    parser.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                        help="adapted layers: q,k,v,o,gate,up,down in the decoder; with --lora-vision also "
                             "q,k,v,out,fc1,fc2 in the vision tower")
    parser.add_argument("--lora-vision", action="store_true", help="adapt the vision tower's layers too")
    parser.add_argument("--lora-layers", help="adapt only these decoder layers, e.g. 0,1 or 2-3 (default: all)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--loss-average", choices=["token", "record"], default="token",
                        help="the loss is the mean over the batch's suffix tokens (token), or over its records of "
                             "each record's mean (record: a one-word answer weighs as much as a long one)")
    parser.add_argument("--distill", type=float, default=0.0, metavar="W",
                        help="with --lora: plus W x KL(base || model) over the suffix of records marked "
                             '"distill": true (the base: the model with its adapters off)')
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="bfloat16: frozen weights held in bfloat16, trained ones in float32, under autocast")
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing: recompute each layer in the backward pass (less memory)")
    parser.add_argument("--loc-sigma", type=float, default=0.0,
                        help="soft targets over neighbouring loc bins (in bins)")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-max", type=int, default=200, help="held-out records answered by generation")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--export", metavar="DIR", help="after training, export OUT/last to ONNX in DIR and validate "
                                                        "it (python -m export)")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="with --export")
    parser.add_argument("--format", choices=["three-graphs", "transformers.js"], help="with --export")
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


def box_iou(a, b) -> float:
    """IoU of two (x_min, y_min, x_max, y_max) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def detection_iou(truth: str, answer: str, width: int, height: int) -> tuple[float, int]:
    """(sum of IoUs, number of true boxes): each true box of `truth` (parse_detections) matched to the unused
    answered box of its label that overlaps it most (0 where there is none)."""
    unused = parse_detections(answer, width, height)
    total, boxes = 0.0, parse_detections(truth, width, height)
    for want in boxes:
        scored = [(box_iou(want.box, got.box), i) for i, got in enumerate(unused) if got.label == want.label]
        best, index = max(scored, default=(0.0, None))
        if index is not None:
            unused.pop(index)
        total += best
    return total, len(boxes)


@dataclass(frozen=True)
class GeneratedScores:
    """train's `evaluate` by generation: held-out records answered greedily; `exact_match` is the share answered
    exactly (stripped), `box_iou` the mean IoU of the true boxes (parse_detections, matched by label) over the
    records whose suffix holds `<loc>` boxes. Under torchrun each process answers its share (the same number of
    rows and tokens on each, as FSDP's gathers need) and the counts are summed."""

    model: torch.nn.Module
    processor: PaliGemmaProcessor
    records: list[dict]
    batch_size: int
    parallel: Parallel = Parallel()

    def __call__(self, step: int) -> dict:
        from .engines import TorchEngine
        from .generate import Pipeline
        from .processor import load_image

        mine = self.records[self.parallel.rank :: self.parallel.world]
        padded = len(self.records[:: self.parallel.world])  # the most any process has
        rows = [(r, 1.0) for r in mine] + [(self.records[0], 0.0)] * (padded - len(mine))
        pipe = Pipeline(self.model, self.processor, lambda: TorchEngine(self.model))
        eos = set(self.processor.config.eos_token_ids)
        longest = max(len(self.processor.tokenizer.encode(r["suffix"], add_special_tokens=False).ids)
                      for r in self.records)
        exact = answered = iou_sum = boxes = 0.0
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            images = [load_image(r["image"]) for r, _ in chunk]
            # Under torchrun every process decodes the same number of tokens: no early stop, cut at <eos> here.
            results = pipe.generate(images, [r["prefix"] for r, _ in chunk], max_new_tokens=longest + 2,
                                    stop_ids=() if self.parallel.distributed else None)
            for (record, weight), image, result in zip(chunk, images, results):
                ids = result.token_ids
                ids = ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]
                text = self.processor.tokenizer.decode(ids, skip_special_tokens=False).strip()
                answered += weight
                exact += weight * (text == record["suffix"].strip())
                if "<loc" in record["suffix"]:
                    total, count = detection_iou(record["suffix"], text, *image.size)
                    iou_sum += weight * total
                    boxes += weight * count
        exact, answered, iou_sum, boxes = self.parallel.sum([exact, answered, iou_sum, boxes])
        scores = {"exact_match": exact / answered}
        if boxes:
            scores["box_iou"] = iou_sum / boxes
        return scores


def save_with_tokenizer(model: torch.nn.Module, tokenizer: Tokenizer, directory: Path):
    """A checkpoint folder: the model's config.json and model.safetensors, and tokenizer.json."""
    from .weights import save_checkpoint

    save_checkpoint(model, directory)
    tokenizer.save(str(Path(directory) / "tokenizer.json"))


def finetune_of(args):
    """The run's FineTune from the command line, checked (a one-line ValueError for what cannot train)."""
    from .finetune import DTYPES, FineTune, parse_parts
    from .lora import LoraSpec, parse_layers, parse_targets

    lora = None
    if args.lora is not None:
        lora = LoraSpec(r=args.lora, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora,
                        targets=parse_targets(args.lora_targets), vision=args.lora_vision, dropout=args.lora_dropout,
                        layers=parse_layers(args.lora_layers) if args.lora_layers is not None else None)
    elif args.lora_alpha is not None or args.lora_vision or args.lora_layers is not None:
        raise ValueError("--lora-alpha, --lora-vision and --lora-layers go with --lora R")
    parts = parse_parts(args.train) if args.train is not None else (() if lora else ("all",))
    finetune = FineTune(parts, lora, DTYPES[args.dtype], args.checkpointing)
    finetune.check()
    return finetune


def check_batch(args, world: int):
    """The global batch must split evenly over the processes and micro-batches."""
    if args.grad_accum < 1:
        raise ValueError(f"--grad-accum {args.grad_accum}: give 1 or more micro-batches per step")
    if args.batch_size < 1 or args.batch_size % (world * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} process(es) x --grad-accum "
                         f"{args.grad_accum}: give a multiple of {world * args.grad_accum}")


def model_to_train(args, finetune=None) -> tuple[torch.nn.Module, Path, dict]:
    """The command's model, prepared by `finetune` (adapters added, the rest frozen, dtypes set), the path of its
    tokenizer.json, and where its weights came from: {"base": the checkpoint the run started from (None: a fresh
    model), "frozen_from": the folder whose tensors the frozen weights are written from, "trained": the names of
    the trained parameters}. A fresh model comes from --config and --tokenizer; a checkpoint from --model; a LoRA run
    resumed from its base with its adapter; another resumed run from its checkpoint."""
    from .checkpoint import resolve_checkpoint
    from .config import PaliGemmaConfig
    from .finetune import FineTune, read_base, read_run_record
    from .lora import read_adapter
    from .model import PaliGemmaForConditionalGeneration
    from .weights import load_model

    finetune = finetune or FineTune()
    # Sharded (FSDP), the weights stay on the CPU until fully_shard moves each process's shards to its device, so
    # that no device ever holds the whole model.
    sharded = finetune.trains_everything and int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = "cpu" if sharded else args.device
    resume = Path(args.resume) if args.resume else None
    if resume and not (resume / STATE_JSON).is_file():
        raise ValueError(f"--resume {resume}: no {STATE_JSON} there; give a checkpoint folder this command wrote "
                         "(OUT/last or OUT/step-N)")
    record = read_run_record(resume) if resume else {}
    if resume and record and record.get("finetune") != finetune.to_dict():
        raise ValueError(f"--resume {resume}: that run trained {json.dumps(record.get('finetune'))}; resume it "
                         "with the same --train, --lora, --lora-alpha, --lora-targets, --lora-vision, --lora-layers "
                         "and --dtype")
    if resume and finetune.lora is not None:
        base = Path(record["base"]) if record.get("base") else None
        if base is None or not base.is_dir():
            raise ValueError(f"--resume {resume}: the LoRA run's base checkpoint {base} is not there; the adapter "
                             "trains on it")
        source = base
    elif resume:
        base = Path(record["base"]) if record.get("base") else None
        source = resume
    elif args.model:
        base = source = resolve_checkpoint(args.model)
    else:
        base = source = None
    if source is not None:
        model = load_model(source, device=device, dtype=finetune.dtype)
        tokenizer = Path(args.tokenizer or Path(source if not resume else resume) / "tokenizer.json")
        torch.manual_seed(args.seed)  # the adapters' initial A: the same in every process and every run
        trained = finetune.prepare(model)
        in_full = [n for n in trained if ".lora_" not in n]
        if finetune.dtype != torch.float32 and in_full:  # the float32 master weights, read as stored
            with torch.no_grad():
                exact = read_base(source, set(in_full), torch.float32)
                parameters = dict(model.named_parameters())
                for name in in_full:
                    parameters[name].copy_(exact[name])
        if resume:
            restore_trained(model, resume, finetune, read_adapter)
        return model, tokenizer, {"base": base, "frozen_from": source, "trained": trained}
    if not args.config:
        raise ValueError("give --model (fine-tune a checkpoint) or --config with --tokenizer (train a fresh model)")
    if not args.tokenizer:
        raise ValueError("--config needs --tokenizer (a tokenizer.json whose ids fit the config's vocabulary)")
    if not finetune.trains_everything:
        raise ValueError("a fresh model (--config) trains in full: --train all, no --lora; freezing parts of it "
                         "would keep random weights (give --model CHECKPOINT to fine-tune parts)")
    torch.manual_seed(args.seed)
    model = PaliGemmaForConditionalGeneration(PaliGemmaConfig.from_json_file(args.config))
    init_weights(model)
    model = model.to(device)
    trained = finetune.prepare(model)
    return model, Path(args.tokenizer), {"base": None, "frozen_from": None, "trained": trained}


def restore_trained(model: torch.nn.Module, resume: Path, finetune, read_adapter):
    """A resumed run's trained weights in float32: a LoRA run's from its adapter, another's from the checkpoint's
    master weights where it stores less than float32 (its model.safetensors otherwise, already loaded)."""
    from .finetune import MASTERS

    parameters = dict(model.named_parameters())
    if finetune.lora is not None:
        tensors = read_adapter(resume / "adapter")
    elif (resume / MASTERS).exists():
        tensors = load_file(str(resume / MASTERS))
    else:
        return
    with torch.no_grad():
        for name, value in tensors.items():
            parameters[name].copy_(value)


def export_after_training(args, checkpoint: Path):
    """python -m export on the trained checkpoint (a process of its own: this package does not import export/),
    which validates the graphs against torch; a failure is an error naming the export's last line."""
    command = [sys.executable, "-m", "export", "--model", str(Path(checkpoint).resolve()),
               "--output", str(Path(args.export).resolve())]
    if args.quantize:
        command += ["--quantize", args.quantize]
    if args.format:
        command += ["--format", args.format]
    print(f"exporting {checkpoint} to {args.export}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"the export of {checkpoint} failed ({last}); the checkpoint is kept: rerun "
                           f"`python {' '.join(command[1:])}` to retry")
    print(f"exported and validated: {args.export}", flush=True)


def run_train(args):
    from .finetune import CheckpointWriter, run_record, stored_dtype

    # Everything a run can be told is wrong is checked before a weight is read or a step runs.
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers}: give 0 (load batches between steps) or more processes")
    if (args.quantize or args.format) and not args.export:
        raise ValueError("--quantize and --format describe the export: give --export DIR too")
    finetune = finetune_of(args)
    check_batch(args, int(os.environ.get("WORLD_SIZE", "1")))
    if args.distill < 0 or args.distill and finetune.lora is None:
        raise ValueError(f"--distill {args.distill:g}: give a weight of 0 or more, with --lora R (the base it "
                         "distills from is the model with its adapters off)")
    records = read_jsonl(Path(args.data))
    if len(records) < args.batch_size:
        raise ValueError(f"{args.data} holds {len(records)} records, fewer than --batch-size {args.batch_size}")
    held_out = read_jsonl(Path(args.eval_data)) if args.eval_data else None
    parallel = Parallel.from_environment(args.device)
    try:
        model, tokenizer_path, origin = model_to_train(args, finetune)
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        processor = PaliGemmaProcessor(tokenizer, model.config)
        # The parallelism, stated once: FSDP shards a model that trains in full, DDP replicates a partly frozen one.
        runner = parallel.wrap(model, shard=finetune.trains_everything)
        batches = jsonl_batches(records, processor, args.batch_size, args.seed,
                                parallel if parallel.distributed else None, args.loss_average == "record")
        loss_fn = lm_loss(loc_range_of(tokenizer), args.loc_sigma, args.distill)
        evaluate = None
        if held_out:
            losses = HeldOutLoss(model, loss_fn, jsonl_batches(held_out, processor, args.batch_size, args.seed),
                                 count=max(1, len(held_out) // args.batch_size))
            scores = GeneratedScores(model, processor, held_out[: args.eval_max], args.batch_size, parallel)

            def evaluate(step):
                return {**losses(step), **scores(step)}

        base = origin["base"]
        dtype = stored_dtype(origin["frozen_from"]) if origin["frozen_from"] else torch.float32
        writer = CheckpointWriter(runner, finetune, origin["trained"], origin["frozen_from"], dtype, tokenizer,
                                  parallel.is_main, str(base) if base else None, run_record(finetune, base, dtype))
        options = TrainOptions(
            steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
            clip_norm=args.clip_norm, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
            progress=not args.no_progress,
            workers=default_workers(args.device) if args.workers is None else args.workers,
            grad_accum=args.grad_accum, optimizer=args.optimizer,
            autocast=finetune.dtype if finetune.dtype != torch.float32 else None,
        )
        if parallel.is_main:
            trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
            lora = f", LoRA r={finetune.lora.r}" if finetune.lora else ""
            print(f"training {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters "
                  f"({', '.join(finetune.parts) or 'none'} in full{lora}; frozen in {args.dtype}) on "
                  f"{parallel.world} process(es)", flush=True)
        train(runner, batches, loss_fn, options, out_dir=Path(args.out), save=writer, evaluate=evaluate,
              resume=Path(args.resume) if args.resume else None, parallel=parallel)
        if args.export and parallel.is_main:
            export_after_training(args, Path(args.out) / "last")
        parallel.barrier()
    finally:
        parallel.close()
