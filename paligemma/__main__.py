"""Command line: `python -m paligemma generate ...`, `python -m paligemma batch ...` (a whole dataset),
`python -m paligemma train ...` and `python -m paligemma classify ...` (zero-shot with a SigLIP checkpoint)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .batch_command import add_batch_arguments, run_batch
from .cli import ArgumentParser


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint folder or Hub repo id (default: the embedded demo model)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", required=True, help='task prompt, e.g. "caption en" or "detect circle"')
    parser.add_argument("--max-new-tokens", type=int, default=64)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    mode.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--engine", default=None, choices=["eager", "static"],
                        help="torch engine (default: static, compiled with CUDA graphs, on cuda; eager on cpu)")
    parser.add_argument("--onnx-dir", default=None, help="exported graphs (backend onnx); default: the export cache")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def run_generate(args: argparse.Namespace) -> int:
    import paligemma

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    pipe = paligemma.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend,
                          onnx_dir=args.onnx_dir, engine=args.engine)
    sampling = dict(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature is not None,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_p=args.top_p, top_k=args.top_k, seed=args.seed,
    )
    if args.json:
        result = pipe.generate(args.image, args.prompt, **sampling)
        print(json.dumps(dict(text=result.text, token_ids=result.token_ids, ttft_s=round(result.ttft_s, 6),
                              decode_tokens_per_s=round(result.decode_tokens_per_s, 3))))
        return 0
    for update in pipe.stream(args.image, args.prompt, **sampling):
        print(update.delta, end="", flush=True)
    print()
    return 0


def checked_argument(check):
    """An argparse type from a check that raises ValueError: its message becomes the one-line usage error."""

    def argument(text: str):
        try:
            return check(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return argument


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    from .zero_shot import DEFAULT_TEMPLATE, check_template, parse_labels, read_label_file

    parser.add_argument("--model", required=True, help="SigLIP checkpoint folder or Hub repo id (with a text tower)")
    parser.add_argument("--image", required=True, help="image file")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", type=checked_argument(parse_labels),
                        help='labels separated by commas, e.g. "a red circle,a blue square"')
    labels.add_argument("--labels-file", dest="labels", type=checked_argument(read_label_file),
                        help="a text file of labels, one per line (for labels that hold commas)")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, type=checked_argument(check_template),
                        help=f"prompt each label is put in, at {{}} (default: {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run_classify(args: argparse.Namespace) -> int:
    from .checkpoint import resolve_checkpoint
    from .siglip_config import SiglipConfig
    from .siglip_model import load_siglip
    from .siglip_tokenizer import SiglipTokenizer
    from .zero_shot import classify

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    folder = resolve_checkpoint(args.model)
    config = SiglipConfig.from_json_file(folder / "config.json")
    if not config.has_text_tower:  # before reading any weights
        raise ValueError(f"{folder} is a PaliGemma checkpoint: it holds SigLIP's vision tower only, no text tower to "
                         "compare labels with; pass a SigLIP checkpoint (model_type 'siglip', e.g. "
                         "google/siglip-base-patch16-224)")
    tokenizer = SiglipTokenizer.from_pretrained(folder, config.text)
    model = load_siglip(folder, device=args.device, dtype=args.dtype)
    scores = classify(model, tokenizer, args.image, args.labels, args.template)
    if args.json:
        print(json.dumps(dict(template=args.template, scores=[
            dict(label=s.label, probability=round(s.probability, 6), logit=round(s.logit, 6)) for s in scores])))
        return 0
    width = max(len(s.label) for s in scores)
    for s in sorted(scores, key=lambda s: -s.logit):
        print(f"{s.label:<{width}}  {s.probability:8.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m paligemma", description="PaliGemma 1 and 2 in PyTorch")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(commands.add_parser("generate", help="answer a prompt about an image"))
    add_batch_arguments(commands.add_parser("batch", help="answer a prompt about every image of a folder, glob or "
                                                          "JSONL, into a resumable JSONL of answers"))
    add_classify_arguments(commands.add_parser("classify", help="zero-shot: score labels on an image with SigLIP"))
    train_parser = commands.add_parser("train", help="fine-tune a checkpoint or train one from a config")
    # train's options come with its module, which imports torch: read only where the command is train (or none
    # yet), so that the others (the batch command's Ray driver) start without it.
    words = [word for word in (sys.argv[1:] if argv is None else argv) if not word.startswith("-")]
    add_train_arguments = run_train = None
    if not words or words[0] == "train":
        try:
            from .train import add_train_arguments, run_train
        except ImportError:
            pass
    if add_train_arguments is not None:
        add_train_arguments(train_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "batch":
            return run_batch(args)
        if args.command == "classify":
            return run_classify(args)
        if run_train is None:
            raise RuntimeError("training is not available in this install")
        return run_train(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, no traceback: the messages are written for users
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
