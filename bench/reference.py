"""transformers set up as the reference: its PaliGemma processor over a checkpoint's tokenizer.json (the benchmark's
transformers runtime and the tests' reference inputs are built with it)."""

from __future__ import annotations

from pathlib import Path


def transformers_processor(folder: Path, image_size: int, num_image_tokens: int):
    """transformers' PaliGemmaProcessor over the checkpoint's tokenizer.json, as PaliGemma configures SigLIP's."""
    from transformers import PaliGemmaProcessor, PreTrainedTokenizerFast
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<bos>",
                                        eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="left")
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size},
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image_processor.image_seq_length = num_image_tokens
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
