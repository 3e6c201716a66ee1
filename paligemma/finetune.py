"""What a fine-tuning run trains, in which dtype, and the checkpoint it writes.

`--train` names the parts trained in full (combinable, comma-separated): `all`; `llm` (the decoder, its embedding
included); `attention` (the decoder's q, k, v, o: big_vision's colab recipe); `projector`; `vision` (the SigLIP
tower). `--lora R` adds adapters (paligemma.lora) and trains them; `--train` then names what else trains in full
(default nothing; only `projector`, and `vision` where the adapters leave it alone, since the others hold the adapted
layers). Everything else is frozen: no gradient, and with `--dtype bfloat16` held in bfloat16, while the trained
weights stay float32 (the optimizer's master weights) and the forward runs under autocast.

The checkpoint (OUT/step-N, OUT/last) is the model with the adapters merged, every tensor in the dtype the base
checkpoint stores: the frozen ones read back from the base, never from a bfloat16 working copy; the base's mask
decoder (a checkpoint that segments) is copied beside it. A LoRA run also writes the adapter in PEFT's layout to
`adapter/` inside it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .lora import LoraSpec, add_lora, check_targets, lora_modules, merge, save_adapter
from .weights import MASK_DECODER_NAME

TRAIN_PARTS = {
    "all": r".*",
    "llm": r"language_model\..*",
    "attention": r"language_model\.model\.layers\.\d+\.self_attn\..*",
    "projector": r"multi_modal_projector\..*",
    "vision": r"vision_tower\..*",
}
# With --lora, parts trained in full beside the adapters are saved in the adapter as PEFT's modules_to_save.
MODULES_TO_SAVE = {"projector": "multi_modal_projector", "vision": "vision_tower"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RUN_JSON = "finetune.json"  # beside each checkpoint: what the run trains and on which base, read by --resume
MASTERS = "master_weights.safetensors"  # a run that stores less than float32: its trained weights in float32


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in parts if p not in TRAIN_PARTS]
    if unknown:
        raise ValueError(f"--train {','.join(unknown)}: not a part of the model; give some of {', '.join(TRAIN_PARTS)}")
    return parts


@dataclass(frozen=True)
class FineTune:
    """What trains (`parts` in full, `lora` adapters), the dtype of the frozen weights, gradient checkpointing."""

    parts: tuple[str, ...] = ("all",)
    lora: LoraSpec | None = None
    dtype: torch.dtype = torch.float32
    checkpointing: bool = False

    def check(self):
        """The combinations that cannot train, as one-line ValueErrors (before any weight is read)."""
        if self.lora is None:
            if not self.parts:
                raise ValueError("--train names nothing to train: give some of "
                                 f"{', '.join(TRAIN_PARTS)}, or --lora R to train adapters")
            return
        if self.lora.r < 1:
            raise ValueError(f"--lora {self.lora.r}: the rank must be at least 1 (8 is the usual choice)")
        check_targets(self.lora)
        if "all" in self.parts:
            raise ValueError("--lora with --train all: the adapters would train weights that train in full anyway; "
                             "drop --lora, or name the parts to train beside the adapters (projector, vision)")
        overlapping = [p for p in self.parts if p in ("llm", "attention") or (p == "vision" and self.lora.vision)]
        if overlapping:
            raise ValueError(f"--lora with --train {','.join(overlapping)}: those parts hold the adapted layers; "
                             "beside --lora, --train may name projector, and vision without --lora-vision")

    @property
    def trains_everything(self) -> bool:
        return self.lora is None and "all" in self.parts

    @property
    def modules_to_save(self) -> list[str]:
        return [MODULES_TO_SAVE[p] for p in self.parts if p in MODULES_TO_SAVE] if self.lora else []

    def prepare(self, model: nn.Module) -> list[str]:
        """Adds the adapters, freezes the rest, puts frozen weights in `dtype`, trained ones in float32; returns the
        names of the trained parameters."""
        self.check()
        if self.lora is not None:
            add_lora(model, self.lora)
        pattern = re.compile("|".join(f"({TRAIN_PARTS[p]})" for p in self.parts)) if self.parts else None
        trained = []
        for name, param in model.named_parameters():
            train = ".lora_A." in name or ".lora_B." in name or (pattern is not None and pattern.fullmatch(name))
            param.requires_grad_(bool(train))
            dtype = torch.float32 if train else self.dtype
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
            if train:
                trained.append(name)
        if not trained:
            raise ValueError(f"--train {','.join(self.parts)} leaves nothing to train in this model")
        model.language_model.model.checkpointing = self.checkpointing
        model.vision_tower.vision_model.encoder.checkpointing = self.checkpointing
        return trained

    def to_dict(self) -> dict:
        return {"parts": list(self.parts), "lora": self.lora.to_dict() if self.lora else None,
                "dtype": str(self.dtype).removeprefix("torch.")}


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (that of its token embedding, the largest tensor)."""
    from safetensors import safe_open

    from .checkpoint import weight_files
    from .weights import canonical_key

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for file in weight_files(Path(folder)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if canonical_key(key) == "language_model.model.embed_tokens.weight":
                    return names[f.get_slice(key).get_dtype()]
    return torch.float32


def read_base(folder: Path, names: set[str] | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors `names` (all with None) of a checkpoint under this package's names, on the CPU in `dtype`."""
    from .checkpoint import weight_files
    from .weights import canonical_key, read_tensors

    def wanted(key):
        name = canonical_key(key)
        return name if names is None or name in names else None

    state, _ = read_tensors(weight_files(Path(folder)), "cpu", dtype, wanted)
    return state


@dataclass
class CheckpointWriter:
    """`save(directory)` for train(): the merged model in `dtype` (the base's), tokenizer.json, RUN_JSON (what the
    run trains, on which base) and, with LoRA, the adapter in adapter/. The frozen tensors are read from `frozen_from`
    (None: a fresh model, whose weights all train). Called on every process: the state is gathered from all, and the
    main one writes."""

    runner: nn.Module
    finetune: FineTune
    trained: list[str]
    frozen_from: Path | None
    dtype: torch.dtype
    tokenizer: object
    is_main: bool = True
    base_name: str | None = None
    record: dict = field(default_factory=dict)

    def __call__(self, directory: Path):
        from .parallel import full_model_state

        state = full_model_state(self.runner)
        if self.is_main:
            self.write(Path(directory), state)

    def write(self, directory: Path, state: dict[str, torch.Tensor]):
        from safetensors.torch import save_file

        from .parallel import unwrap
        from .weights import save_state

        model = unwrap(self.runner)
        trained = set(self.trained)
        frozen = {k for k in state if k not in trained and ".lora_" not in k}
        base = read_base(self.frozen_from, frozen, self.dtype) if self.frozen_from is not None and frozen else {}
        merged = {}
        for key, value in state.items():
            if ".lora_" not in key:
                merged[key] = value.to(self.dtype) if key in trained else base[key]
        for name, module in lora_modules(model).items():
            merged[name + ".weight"] = merge(merged[name + ".weight"], state[name + ".lora_A.weight"],
                                             state[name + ".lora_B.weight"], module.scaling)
        save_state(model.config, merged, directory, self.dtype)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        if self.frozen_from is not None and (Path(self.frozen_from) / MASK_DECODER_NAME).is_file():
            shutil.copyfile(Path(self.frozen_from) / MASK_DECODER_NAME, directory / MASK_DECODER_NAME)
        (directory / RUN_JSON).write_text(json.dumps(self.record, indent=1) + "\n")
        if self.finetune.lora is not None:
            save_adapter(directory / "adapter", self.finetune.lora, state, self.finetune.modules_to_save,
                         self.base_name)
        elif self.dtype != torch.float32:  # the trained weights as the optimizer holds them, for --resume
            save_file({k: state[k].float().contiguous() for k in self.trained}, str(directory / MASTERS))


def run_record(finetune: FineTune, base: Path | None, dtype: torch.dtype) -> dict:
    """What training_state.json records of the run, for --resume to rebuild it."""
    return {"finetune": finetune.to_dict(), "base": str(base.resolve()) if base else None,
            "stored_dtype": str(dtype).removeprefix("torch.")}


def read_run_record(directory: Path) -> dict:
    """RUN_JSON of a checkpoint --resume continues ({} for one written before it existed)."""
    path = Path(directory) / RUN_JSON
    return json.loads(path.read_text()) if path.is_file() else {}
