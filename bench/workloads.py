"""The checkpoints benchmarked, built once and cached on disk, and the request every runtime answers.

- tiny: a few thousand parameters per layer; for the smoke mode CI runs.
- demo: the embedded demo model (paligemma/demo_checkpoint).
- wide: PaliGemma-3B's widths (SigLIP So400m/14 at 224, Gemma 2B, the 257216-row vocabulary) with 2 layers per
  tower: the real model's per-layer and vocabulary costs in about 3 GB of float32.
- full3b (CUDA mode): the whole PaliGemma-3B shape, 27 vision and 18 decoder layers, in bfloat16.

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

import paligemma
from paligemma.config import PaliGemmaConfig
from paligemma.gemma import RMSNorm
from paligemma.model import PaliGemmaForConditionalGeneration
from paligemma.weights import save_checkpoint
from shapes.tokenizer import build_tokenizer

BUILD_VERSION = "2"  # bump when a random checkpoint's recipe changes, so cached ones are rebuilt
PROMPT = "caption en"
WORDS = ("caption", "en", "answer", "detect", "a", "the", "\n")
EXPORTER_SOURCES = ("graphs.py", "onnx_export.py", "streaming.py", "checkpoint_stream.py", "external_data.py",
                    "manifest.py")  # what an export is made by (export/)

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

    def folder(self, cache_dir: Path) -> Path:
        if self.shape is None:
            return paligemma.DEMO_CHECKPOINT
        return Path(cache_dir) / f"{self.name}-v{BUILD_VERSION}"

    def prepare(self, cache_dir: Path, dtype: torch.dtype = torch.float32, device="cpu", log=print) -> Path:
        """The checkpoint folder, built (and cached) on first use."""
        folder = self.folder(cache_dir)
        if self.shape is None:
            if not (folder / "config.json").exists():
                raise FileNotFoundError(f"{folder} holds no checkpoint yet: the demo model is not in this tree; "
                                        "choose another workload with --workloads")
            return folder
        if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
            return folder
        log(f"building the random '{self.name}' checkpoint in {folder} (once)")
        staging = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        config = PaliGemmaConfig.from_dict(config_dict(self.shape, self.vision_layers, self.text_layers))
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
    "full3b": Workload("full3b", "PaliGemma-3B shape (27+18 layers), random bfloat16", PALIGEMMA_3B,
                       vision_layers=27, text_layers=18),
}


def config_dict(shape: dict, vision_layers: int, text_layers: int) -> dict:
    """A PaliGemma 1 config.json for `shape` with the given numbers of layers."""
    text = dict(shape["text"], model_type="gemma", num_hidden_layers=text_layers, hidden_act="gelu_pytorch_tanh",
                max_position_embeddings=8192)
    vision = dict(shape["vision"], model_type="siglip_vision_model", num_hidden_layers=vision_layers)
    return dict(model_type="paligemma", text_config=text, vision_config=vision, projection_dim=text["hidden_size"],
                image_token_index=shape["image_token_index"], eos_token_id=1)


@torch.no_grad()
def random_model(config: PaliGemmaConfig, dtype: torch.dtype, device, std: float, embed_std: float,
                 attn_out_std: float) -> PaliGemmaForConditionalGeneration:
    """Weights ~ N(0, std) (the embedding ~ N(0, embed_std), attention outputs ~ N(0, attn_out_std)), biases 0,
    norms at identity (LayerNorm weight 1; Gemma's RMSNorm scales by 1 + w, so w = 0)."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm) or name == "bias":
                p.zero_()
            elif isinstance(module, torch.nn.LayerNorm):
                p.fill_(1.0)
            else:
                scale = {"embed_tokens": embed_std, "o_proj": attn_out_std}.get(module_name.rsplit(".", 1)[-1], std)
                p.normal_(0.0, scale, generator=generator)
    return model.eval()


def request_image(size: int = 224) -> Image.Image:
    """The image every runtime is given: a fixed pattern of coloured blocks and a gradient."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).astype(np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, size * 3 // 4, 2)
        pixels[top : top + size // 5, left : left + size // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def export_key(folder: Path) -> str:
    """A short key naming a cached export: it changes with the checkpoint's config or weights and with the exporter's
    source, so that an improved exporter is measured, not a stale export."""
    import export
    from export.manifest import weights_fingerprint

    digest = hashlib.sha256(json.dumps(json.loads((Path(folder) / "config.json").read_text()), sort_keys=True).encode())
    digest.update(weights_fingerprint(Path(folder)).encode())
    for name in EXPORTER_SOURCES:
        digest.update((Path(export.__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]
