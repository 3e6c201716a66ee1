"""Peak memory of fine-tuning steps at the full PaliGemma-3B shape (random weights, nothing read from disk).

    /usr/bin/time -v python -m bench.finetune_memory --recipe lora [--steps 3] [--batch-size 4] [--suffix-tokens 32]
    torchrun --nproc-per-node N -m bench.finetune_memory --recipe full --text-layers 4 --vision-layers 2 ...

Builds paligemma-3b-pt-224's shape (SigLIP So400m/14 at 224 px, 27 layers; Gemma 2B, 18 layers; the 257,216-row
embedding) directly in the frozen weights' dtype, prepares it as `python -m paligemma train` does (paligemma.finetune)
and runs `--steps` steps of paligemma.train.train on synthetic batches: 256 image tokens, the prompt
"caption en" and a suffix of `--suffix-tokens` tokens. Recipes:
- lora: LoRA r = 8 on q, k, v, o, gate, up, down, frozen weights in bfloat16, gradient checkpointing, AdamW;
- attention: big_vision's colab: the decoder's attention layers trained (float32 masters), the rest frozen in
  bfloat16, AdamW (`--sgd` for its SGD), `--checkpointing` optional;
- full: every weight trained in float32 (AdamW): what FSDP divides among devices (see docs/fine-tuning.md).
Prints the parameter counts, each step's time and the process's peak RSS (ru_maxrss) after building and after the
steps; on CUDA (`--device cuda`) also torch's peak allocated memory. Under torchrun the model is built on the meta
device, sharded as paligemma.parallel shards it (FSDP2 for `full`, each process then filling only its shards) and each
process's peak is reported: what one device holds. `--text-layers`, `--vision-layers` and `--vocab` shrink the model
to one that fits the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from bench.workloads import PALIGEMMA_3B, config_dict
from paligemma import train as T
from paligemma.config import PaliGemmaConfig
from paligemma.finetune import FineTune
from paligemma.lora import LoraSpec
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.parallel import Parallel

RECIPES = {
    "lora": dict(parts=(), lora=LoraSpec(r=8, alpha=16), dtype=torch.bfloat16, checkpointing=True),
    "attention": dict(parts=("attention",), lora=None, dtype=torch.bfloat16, checkpointing=False),
    "full": dict(parts=("all",), lora=None, dtype=torch.float32, checkpointing=False),
}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def shape_config(vision_layers: int = 27, text_layers: int = 18, vocab: int | None = None) -> PaliGemmaConfig:
    """paligemma-3b-pt-224's config (REFERENCE.md's shapes), or that of a smaller model with its widths."""
    shape = dict(PALIGEMMA_3B, text=dict(PALIGEMMA_3B["text"], vocab_size=vocab or PALIGEMMA_3B["text"]["vocab_size"]))
    if vocab:
        shape["image_token_index"] = vocab - 64
    return PaliGemmaConfig.from_dict(config_dict(shape, vision_layers, text_layers))


def meta_model(config: PaliGemmaConfig, dtype: torch.dtype) -> PaliGemmaForConditionalGeneration:
    with torch.device("meta"):
        return PaliGemmaForConditionalGeneration(config).to(dtype)


@torch.no_grad()
def fill_random(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """Allocates the model's tensors (or, sharded, this process's shards) in their dtype: no float32 copy on the way;
    weights ~ N(0, 0.02), norms at identity, biases 0."""
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if p.dim() >= 2:
            local.normal_(0.0, 0.02, generator=generator)
        else:
            local.fill_(1.0 if "vision_tower" in name and "norm" in name and name.endswith("weight") else 0.0)
    return model


def synthetic_batch(config: PaliGemmaConfig, rows: int, suffix_tokens: int) -> dict:
    """rows x (256 image tokens, <bos>, 3 prompt tokens, "\\n", the suffix, <eos>) with labels on the suffix."""
    image = [config.image_token_index] * config.num_image_tokens
    prefix = image + [config.bos_token_id, 1000, 1001, 108]
    generator = torch.Generator().manual_seed(1)
    suffix = torch.randint(1000, min(200000, config.image_token_index), (rows, suffix_tokens), generator=generator)
    ids = torch.cat([torch.tensor(prefix).expand(rows, -1), suffix, torch.ones(rows, 1, dtype=torch.long)], 1)
    types = torch.cat([torch.zeros(rows, len(prefix), dtype=torch.long),
                       torch.ones(rows, suffix_tokens + 1, dtype=torch.long)], 1)
    labels = ids.masked_fill(types == 0, T.IGNORE)
    pixels = torch.rand(rows, 3, config.image_size, config.image_size, generator=generator) * 2 - 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types, "labels": labels,
            "pixel_values": pixels}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=list(RECIPES), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--suffix-tokens", type=int, default=32)
    parser.add_argument("--checkpointing", action="store_true", help="force gradient checkpointing on")
    parser.add_argument("--sgd", action="store_true", help="momentum-free SGD instead of AdamW")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vision-layers", type=int, default=27)
    parser.add_argument("--text-layers", type=int, default=18)
    parser.add_argument("--vocab", type=int, default=None, help="embedding rows (default 257216)")
    args = parser.parse_args(argv)
    recipe = dict(RECIPES[args.recipe])
    recipe["checkpointing"] = recipe["checkpointing"] or args.checkpointing
    finetune = FineTune(**recipe)
    parallel = Parallel.from_environment(args.device)
    started = time.time()
    model = meta_model(shape_config(args.vision_layers, args.text_layers, args.vocab), finetune.dtype)
    torch.manual_seed(0)
    finetune.prepare(model)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    runner = parallel.wrap(model, shard=finetune.trains_everything)  # FSDP shards the meta tensors
    fill_random(runner, str(parallel.device))
    built = peak_rss_gb()
    if parallel.is_main:
        print(f"{args.recipe}: {trained:,} of {total:,} parameters trained on {parallel.world} process(es); built in "
              f"{time.time() - started:.0f} s, peak RSS {built:.2f} GB", flush=True)
    batch = synthetic_batch(model.config, args.batch_size // parallel.world, args.suffix_tokens)
    times = []

    def timed(step):
        times.append(time.time())
        return batch

    options = T.TrainOptions(steps=args.steps, lr=1e-5, warmup=1, progress=False,
                             optimizer="sgd" if args.sgd else "adamw",
                             autocast=finetune.dtype if finetune.dtype != torch.float32 else None)
    T.train(runner, timed, T.lm_loss(), options, log=lambda line: print(line, flush=True), parallel=parallel)
    times.append(time.time())
    peaks = [0.0] * parallel.world
    peaks[parallel.rank] = peak_rss_gb()
    peaks = parallel.sum(peaks)
    if parallel.is_main:
        result = {"recipe": args.recipe, "trained": trained, "total": total, "processes": parallel.world,
                  "checkpointing": finetune.checkpointing, "optimizer": options.optimizer,
                  "batch_size": args.batch_size, "sequence": batch["input_ids"].shape[1],
                  "step_seconds": [round(b - a, 1) for a, b in zip(times, times[1:])],
                  "peak_rss_gb_built": round(built, 2), "peak_rss_gb_per_process": [round(p, 2) for p in peaks]}
        if torch.device(args.device).type == "cuda":
            result["cuda_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        print(json.dumps(result), flush=True)
    parallel.close()


if __name__ == "__main__":
    main()
