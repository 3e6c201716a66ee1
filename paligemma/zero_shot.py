"""Zero-shot classification with SigLIP: each label, put into a prompt template, is scored against the image on its
own (a sigmoid of its logit, as SigLIP was trained), so the probabilities do not sum to one and a label's score does
not depend on which other labels are asked about."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError, shown

if TYPE_CHECKING:
    from .siglip_model import SiglipModel
    from .siglip_tokenizer import SiglipTokenizer

DEFAULT_TEMPLATE = "This is a photo of {}."  # transformers' zero-shot pipeline's default hypothesis
LABEL_SEPARATOR = ","


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float  # sigmoid(logit)
    logit: float


def parse_labels(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'], refusing an empty list, an empty or blank label and duplicates."""
    if not text.strip():
        raise InputError(f"the label list is empty; give labels separated by '{LABEL_SEPARATOR}', e.g. "
                         "\"a red circle,a blue square\"")
    return check_labels(text.split(LABEL_SEPARATOR))


def read_label_file(path: str) -> list[str]:
    """One label per line (labels that hold commas, such as captions), blank lines at the end ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the label file {path}: {e}; give a UTF-8 text file, one label per "
                         "line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(f"the label file {path} is empty; write one label per line")
    return check_labels(lines)


def check_labels(labels: list[str]) -> list[str]:
    if not labels:
        raise InputError("the label list is empty; give at least one label")
    cleaned = []
    for position, label in enumerate(labels, 1):
        if not isinstance(label, str):
            raise InputError(f"label {position} is {shown(label)}, not a string")
        if not label.strip():
            raise InputError(f"label {position} is {'empty' if not label else 'only spaces'} ({shown(label)}); "
                             f"remove it (check for a doubled or trailing '{LABEL_SEPARATOR}')")
        cleaned.append(label.strip())
    seen = set()
    duplicates = [label for label in cleaned if label in seen or seen.add(label)]
    if duplicates:
        raise InputError(f"duplicate label(s): {', '.join(map(repr, dict.fromkeys(duplicates)))}; give each label once")
    return cleaned


def check_template(template: str) -> str:
    if template.count("{}") != 1:
        raise InputError(f"the prompt template {shown(template)} must hold '{{}}' exactly once, where the label goes, "
                         f"e.g. {DEFAULT_TEMPLATE!r}")
    return template


def classify(model: SiglipModel, tokenizer: SiglipTokenizer, image, labels: list[str],
             template: str = DEFAULT_TEMPLATE) -> list[LabelScore]:
    """Scores for `labels` (in their order) on one image (a PIL image, path or bytes)."""
    import torch  # here: the command line's parser reads the label helpers above, and starts without torch

    from .processor import load_image, preprocess_image

    model.require_text_tower()
    labels = check_labels(list(labels))
    template = check_template(template)
    parameter = next(model.parameters())
    size = model.config.vision.image_size
    pixel_values = preprocess_image(load_image(image, size), size)[None]
    input_ids = tokenizer([template.replace("{}", label) for label in labels]).to(parameter.device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values.to(parameter.device, parameter.dtype))[0].float()
    probabilities = torch.sigmoid(logits)
    return [LabelScore(label, float(p), float(z)) for label, p, z in zip(labels, probabilities, logits)]
