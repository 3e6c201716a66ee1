"""LoRA: a Linear that keeps its frozen weight W and adds (B @ A) * alpha / r, A [r, in] and B [out, r] trained.

B starts at zero, so a fresh adapter changes nothing; `merge` folds B @ A into a copy of W for export. The adapter
is written in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`) under the module names of
transformers' PaliGemmaForConditionalGeneration, so that `peft.PeftModel.from_pretrained` loads it there.

Why not peft itself for the layer: peft imports transformers (a test-only reference here) and accelerate on every
training start (about 5 s per process, per torchrun rank), and it names modules by this project's paths, which
differ from transformers' (`language_model.model.layers` here, `model.language_model.layers` there), so the names
have to be rewritten whichever layer trains. The layer is these few lines; tests/test_finetune.py checks it against
peft (the saved adapter loaded by peft onto transformers' model gives this model's logits).

Targets, by short name: in the decoder q, k, v, o (attention) and gate, up, down (MLP); in the vision tower
(`vision=True`) q, k, v, out (attention) and fc1, fc2 (MLP). The default q, k, v, o, gate, up, down with the vision
tower is Hugging Face's PaliGemma recipe: 11,298,816 parameters at r = 8 on the 3B (its vision tower has no `o`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DECODER_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
VISION_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj", "fc1": "fc1", "fc2": "fc2"}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DECODER_LAYERS = re.compile(r"language_model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")
VISION_LAYERS = re.compile(r"vision_tower\.vision_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.(\w+)")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA run adapts: rank r, scale alpha / r, target short names, and whether the vision tower too."""

    r: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    vision: bool = False
    dropout: float = 0.0
    layers: tuple[int, ...] | None = None  # decoder layers adapted (None: all); the vision tower's are all

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        spec = {"r": self.r, "alpha": self.alpha, "targets": list(self.targets), "vision": self.vision,
                "dropout": self.dropout}
        return spec | ({"layers": list(self.layers)} if self.layers is not None else {})


def parse_targets(text: str) -> tuple[str, ...]:
    """"q,k,v" -> ("q", "k", "v"); full module names (q_proj, out_proj) are read as their short names."""
    full = {v: k for table in (DECODER_TARGETS, VISION_TARGETS) for k, v in table.items()}
    names = tuple(dict.fromkeys(full.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()))
    if not names:
        raise ValueError("--lora-targets names no module; give some of "
                         f"{', '.join(DECODER_TARGETS)} (and with --lora-vision {', '.join(VISION_TARGETS)})")
    return names


def parse_layers(text: str) -> tuple[int, ...]:
    """"0,1" -> (0, 1); "2-3" -> (2, 3); "0,2-3" -> (0, 2, 3): decoder layer indices, sorted, each once."""
    layers = set()
    for item in filter(None, (t.strip() for t in text.split(","))):
        first, dash, last = item.partition("-")
        if not first.isdigit() or dash and not last.isdigit() or dash and int(last) < int(first):
            raise ValueError(f"--lora-layers {item}: give decoder layer indices from 0, like 0,1 or 2-3")
        layers.update(range(int(first), int(last if dash else first) + 1))
    if not layers:
        raise ValueError("--lora-layers names no layer; give decoder layer indices from 0, like 0,1 or 2-3")
    return tuple(sorted(layers))


def check_targets(spec: LoraSpec):
    """A target that names no module of the towers `spec` covers is a ValueError saying which names there are."""
    known = list(DECODER_TARGETS) + ([t for t in VISION_TARGETS if t not in DECODER_TARGETS] if spec.vision else [])
    unknown = [t for t in spec.targets if t not in DECODER_TARGETS and not (spec.vision and t in VISION_TARGETS)]
    if unknown:
        hint = "" if spec.vision else f" (the vision tower's {', '.join(VISION_TARGETS)} with --lora-vision)"
        raise ValueError(f"--lora-targets {','.join(unknown)} names no module; known: {', '.join(known)}{hint}")


def target_names(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The names of the Linear modules `spec` adapts (check_targets' error for a name that adapts none)."""
    check_targets(spec)
    wanted = {DECODER_TARGETS[t] for t in spec.targets if t in DECODER_TARGETS}
    wanted_vision = {VISION_TARGETS[t] for t in spec.targets if t in VISION_TARGETS} if spec.vision else set()
    names, decoder_layers = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        decoder, vision = DECODER_LAYERS.fullmatch(name), VISION_LAYERS.fullmatch(name)
        if decoder:
            decoder_layers.add(int(decoder.group(1)))
        if decoder and decoder.group(3) in wanted and (spec.layers is None or int(decoder.group(1)) in spec.layers):
            names.append(name)
        elif vision and vision.group(2) in wanted_vision:
            names.append(name)
    missing = sorted(set(spec.layers or ()) - decoder_layers)
    if missing:
        raise ValueError(f"--lora-layers {','.join(map(str, missing))}: this model's decoder has layers 0 to "
                         f"{len(decoder_layers) - 1}")
    if not names:
        raise ValueError(f"--lora-targets {','.join(spec.targets)} names no module of this model")
    return names


class LoRALinear(nn.Linear):
    """nn.Linear with its frozen weight (and bias) plus lora_A [r, in], lora_B [out, r] in float32; state-dict names
    `weight`, `bias`, `lora_A.weight`, `lora_B.weight` as peft's (minus its adapter name)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        with torch.device("meta"):
            super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # False: the frozen layer alone (adapters_off)
        self.reset_lora()

    def reset_lora(self):
        """peft's default initialisation: A Kaiming-uniform (a = sqrt(5), nn.Linear's), B zero."""
        if self.lora_A.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # a bfloat16 frozen weight's input, into the float32 adapter
        adapted = self.lora_B(self.lora_A(self.dropout(x)))
        return out + (adapted * self.scaling).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """(B @ A) * alpha / r in float32, the weight's change."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.lora_A.out_features}, scaling={self.scaling}"


def add_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Replaces each target Linear of `model` by a LoRALinear around its own weight (frozen); returns their names."""
    names = target_names(model, spec)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), spec.r, spec.alpha, spec.dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within it, `model` is its base: every LoRALinear computes its frozen layer alone."""
    modules = list(lora_modules(model).values())
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module in modules:
            module.enabled = True


def merge(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + (B @ A) * scaling, computed in float32 and returned in W's dtype."""
    return (weight.float() + (lora_b.float() @ lora_a.float()) * scaling).to(weight.dtype)


# ---- PEFT's layout ------------------------------------------------------------------------------

# This package's module paths and transformers 5's PaliGemmaForConditionalGeneration's, prefix for prefix.
TRANSFORMERS_PREFIXES = (("language_model.model.", "model.language_model."),
                         ("vision_tower.vision_model.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector."))


def transformers_name(name: str) -> str:
    """This package's module path -> transformers 5's PaliGemmaForConditionalGeneration's (which peft resolves):
    language_model.model.X -> model.language_model.X, vision_tower.vision_model.X -> model.vision_tower.X,
    multi_modal_projector.X -> model.multi_modal_projector.X."""
    for ours, theirs in TRANSFORMERS_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(f"{name} is not a PaliGemma module path")


def project_name(name: str) -> str:
    """The inverse of transformers_name."""
    for ours, theirs in TRANSFORMERS_PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise ValueError(f"{name} is not a module path of transformers' PaliGemma")


def peft_target_pattern(spec: LoraSpec) -> str:
    """PEFT's `target_modules` as the regular expression (peft full-matches it against module names) of exactly the
    adapted modules of transformers' PaliGemma. A subset of decoder layers is part of the expression: peft refuses
    its `layers_to_transform` beside a regular expression, and with target names instead of one its layer index
    would match the vision tower's layers of the same names too."""
    decoder = sorted(DECODER_TARGETS[t] for t in spec.targets if t in DECODER_TARGETS)
    index = r"\d+" if spec.layers is None else "(" + "|".join(map(str, spec.layers)) + ")"
    parts = ([rf"model\.language_model\.layers\.{index}\.(self_attn|mlp)\.(" + "|".join(decoder) + ")"]
             if decoder else [])
    vision = sorted(VISION_TARGETS[t] for t in spec.targets if t in VISION_TARGETS) if spec.vision else []
    if vision:
        parts.append(r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(vision) + ")")
    return "|".join(f"({p})" for p in parts) if len(parts) > 1 else parts[0]


def peft_config(spec: LoraSpec, modules_to_save: list[str], base: str | None) -> dict:
    """adapter_config.json: the fields peft reads for a LoRA adapter."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": peft_target_pattern(spec),
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        # peft matches these by the last part of the module path: the same in both packages.
        "modules_to_save": list(modules_to_save) or None,
        "auto_mapping": {"base_model_class": "PaliGemmaForConditionalGeneration",
                         "parent_library": "transformers.models.paligemma.modeling_paligemma"},
    }


def adapter_tensors(state: dict[str, torch.Tensor], modules_to_save: list[str]) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors' tensors from a state dict in this package's names: each `X.lora_A.weight` and
    `X.lora_B.weight`, and every tensor of `modules_to_save` (trained in full beside the adapter), under PEFT's names
    (`base_model.model.` + transformers' path), in float32."""
    tensors = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module.endswith((".lora_A", ".lora_B")) or any(key.startswith(m + ".") for m in modules_to_save):
            tensors[PEFT_PREFIX + transformers_name(module) + "." + leaf] = value.detach().float().contiguous().cpu()
    return tensors


def save_adapter(directory, spec: LoraSpec, state: dict[str, torch.Tensor], modules_to_save: list[str],
                 base: str | None = None):
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(spec, modules_to_save, base), indent=2) + "\n")
    save_file(adapter_tensors(state, modules_to_save), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter(directory) -> dict[str, torch.Tensor]:
    """An adapter written by save_adapter as a state dict in this package's names (`X.lora_A.weight`, ...)."""
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    return {project_name(key.removeprefix(PEFT_PREFIX)): value for key, value in tensors.items()}
