"""The checkpoints benchmarked, built once and cached on disk, and the request every runtime answers.

- tiny: a few thousand parameters per layer; for the smoke mode CI runs.
- demo: the embedded demo model (paligemma/demo_checkpoint).
- wide: PaliGemma-3B's widths (SigLIP So400m/14 at 224, Gemma 2B, the 257216-row vocabulary) with 2 layers per
  tower: the real model's per-layer and vocabulary costs in about 3 GB of float32.
- full3b: the whole PaliGemma-3B shape, 27 vision and 18 decoder layers (bfloat16 in CUDA mode, float32 on CPU),
  written as the Hub ships it: `model-0000K-of-0000N.safetensors` shards of at most 5 GB and their index, one tensor
  drawn at a time (11.7 GB in float32; the writer holds one shard).

Random checkpoints get a small tokenizer.json with PaliGemma's id layout (`<loc0000>` at 256000, `<seg000>` at
257024, `<image>` at 257152) but only a handful of words: ids without a token decode to nothing, which does not
matter for speed or for comparing token ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import paligemma
from paligemma.config import PaliGemmaConfig
from paligemma.gemma import RMSNorm
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.weights import save_checkpoint
from shapes.tokenizer import build_tokenizer

BUILD_VERSION = "2"  # bump when a random checkpoint's recipe changes, so cached ones are rebuilt
PROMPT = "caption en"
WORDS = ("caption", "en", "answer", "detect", "a", "the", "\n")
# What an export is made by (in export/).
EXPORTER_SOURCES = ("graphs.py", "writer/onnx_export.py", "writer/streaming.py", "writer/checkpoint_stream.py",
                    "writer/external_data.py", "writer/manifest.py", "quantize.py")

# Widths of paligemma-3b-pt-224 (REFERENCE.md); `layers` chooses how many of each tower to keep.
PALIGEMMA_3B = dict(
    vision=dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14, image_size=224),
    text=dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
              vocab_size=257216),
    image_token_index=257152,
)
TINY = dict(
    vision=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, patch_size=14, image_size=28),
    text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
              vocab_size=1216),
    image_token_index=1200,
)


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    shape: dict | None = None  # None: an existing checkpoint (the demo model)
    vision_layers: int = 2
    text_layers: int = 2
    # Weight scales that keep greedy decoding from settling on one token (checked on the wide model: 23 distinct
    # tokens in 24, top-2 logit gap >= 9e-4, far above float32 rounding). The tied embedding must stay small or the
    # output projection echoes the input token; a weak attention output keeps the image from swamping each step.
    std: float = 0.02
    embed_std: float = 0.002
    attn_out_std: float = 0.001
    shard_bytes: int | None = None  # Hub-style shards of at most this size; None: one model.safetensors

    def folder(self, cache_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
        if self.shape is None:
            return paligemma.DEMO_CHECKPOINT
        suffix = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
        return Path(cache_dir) / f"{self.name}-v{BUILD_VERSION}{suffix}"

    def prepare(self, cache_dir: Path, dtype: torch.dtype = torch.float32, device="cpu", log=print) -> Path:
        """The checkpoint folder, built (and cached) on first use."""
        folder = self.folder(cache_dir, dtype)
        if self.shape is None:
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"{folder} holds no checkpoint yet: the demo model is not in this tree; "
                                        "choose another workload with --workloads")
            return folder
        if (folder / "tokenizer.json").exists():  # written last
            return folder
        log(f"building the random '{self.name}' checkpoint in {folder} (once)")
        staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        config = PaliGemmaConfig.from_dict(config_dict(self.shape, self.vision_layers, self.text_layers))
        if self.shard_bytes is not None:
            save_random_shards(config, staging, dtype, self.shard_bytes, self.std, self.embed_std, self.attn_out_std)
        else:
            model = random_model(config, dtype, device, self.std, self.embed_std, self.attn_out_std)
            save_checkpoint(model, staging)
            del model
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the runtimes, in their own processes, need the memory
        build_tokenizer(WORDS, config.image_token_index).save(str(staging / "tokenizer.json"))
        os.replace(staging, folder)
        return folder


WORKLOADS = {
    "tiny": Workload("tiny", "tiny random PaliGemma (smoke test)", TINY, std=0.2, embed_std=0.05, attn_out_std=0.2),
    "demo": Workload("demo", "embedded demo model (paligemma/demo_checkpoint)"),
    "wide": Workload("wide", "PaliGemma-3B widths, 2+2 layers, random", PALIGEMMA_3B),
    "full3b": Workload("full3b", "PaliGemma-3B shape (27+18 layers), random, Hub-style shards", PALIGEMMA_3B,
                       vision_layers=27, text_layers=18, shard_bytes=5 * 10**9),
}


def config_dict(shape: dict, vision_layers: int, text_layers: int) -> dict:
    """A PaliGemma 1 config.json for `shape` with the given numbers of layers."""
    text = dict(shape["text"], model_type="gemma", num_hidden_layers=text_layers, hidden_act="gelu_pytorch_tanh",
                max_position_embeddings=8192)
    vision = dict(shape["vision"], model_type="siglip_vision_model", num_hidden_layers=vision_layers)
    return dict(model_type="paligemma", text_config=text, vision_config=vision, projection_dim=text["hidden_size"],
                image_token_index=shape["image_token_index"], eos_token_id=1)


def initialize(module: torch.nn.Module, module_name: str, name: str, p: torch.Tensor, generator: torch.Generator,
               std: float, embed_std: float, attn_out_std: float) -> None:
    """Weights ~ N(0, std) (the embedding ~ N(0, embed_std), attention outputs ~ N(0, attn_out_std)), biases 0,
    norms at identity (LayerNorm weight 1; Gemma's RMSNorm scales by 1 + w, so w = 0)."""
    if isinstance(module, RMSNorm) or name == "bias":
        p.zero_()
    elif isinstance(module, torch.nn.LayerNorm):
        p.fill_(1.0)
    else:
        scale = {"embed_tokens": embed_std, "o_proj": attn_out_std}.get(module_name.rsplit(".", 1)[-1], std)
        p.normal_(0.0, scale, generator=generator)


@torch.no_grad()
def random_model(config: PaliGemmaConfig, dtype: torch.dtype, device, std: float, embed_std: float,
                 attn_out_std: float) -> PaliGemmaForConditionalGeneration:
    """The model with `initialize`'s weights."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            initialize(module, module_name, name, p, generator, std, embed_std, attn_out_std)
    return model.eval()


@torch.no_grad()
def save_random_shards(config: PaliGemmaConfig, directory: Path, dtype: torch.dtype, shard_bytes: int, std: float,
                       embed_std: float, attn_out_std: float) -> None:
    """`random_model`'s checkpoint written as the Hub ships large ones (shards of at most `shard_bytes` and
    model.safetensors.index.json) without building the model: tensors are drawn one at a time, one shard is held."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    sizes = [0]
    plan = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            nbytes = p.numel() * dtype.itemsize
            if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
                shards.append([]), sizes.append(0)
            full = f"{module_name}.{name}"
            shards[-1].append(full), plan.append((module, module_name, name, tuple(p.shape), len(shards) - 1))
            sizes[-1] += nbytes
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, current, state = {}, 0, {}
    for module, module_name, name, shape, shard in plan + [(None, None, None, None, len(shards))]:
        if shard != current:
            save_file(state, str(directory / names[current]), metadata={"format": "pt"})
            state, current = {}, shard
        if module is None:
            break
        p = torch.empty(shape, dtype=dtype)
        initialize(module, module_name, name, p, generator, std, embed_std, attn_out_std)
        state[f"{module_name}.{name}"] = p
        weight_map[f"{module_name}.{name}"] = names[shard]
    index = dict(metadata=dict(total_size=sum(sizes)), weight_map=weight_map)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config_json = config.to_dict()
    config_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")


def request_image(size: int = 224) -> Image.Image:
    """The image every runtime is given: a fixed pattern of coloured blocks and a gradient."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, size * 3 // 4, 2)
        pixels[top : top + size // 5, left : left + size // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def exporter_source_digest() -> str:
    """A digest of the exporter's source, which the benchmark's export cache adds to its key, so that an improved
    exporter is measured, not a stale export."""
    import export

    digest = hashlib.sha256()
    for name in EXPORTER_SOURCES:  # each must exist: a moved file is an error here, not a silently stale key
        digest.update((Path(export.__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]
