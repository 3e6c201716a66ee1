"""A small Gemma-style tokenizer.json for the shapes task, with PaliGemma's special tokens.

Layout: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3 (as in Gemma), the task's words, then `<image>`,
`<loc0000>`..`<loc1023>` and `<seg000>`..`<seg127>` (paligemma.locations). The loc and seg tokens are added
tokens that are not normalized, so each stays one token wherever it appears, even next to a word.
Spaces become "▁" as in Gemma; a word keeps the "▁" of the space before it ("caption▁en" -> "caption",
"▁en"), so the vocabulary holds each word with and without it. No `<bos>` is added automatically: the
processor puts exactly one after the image tokens.

    python -m shapes.tokenizer OUT.json     # writes the shapes task's tokenizer
"""

import argparse
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from paligemma.locations import LOC_TOKENS, SEG_TOKENS

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
IMAGE_TOKEN = "<image>"
SPACE = "\u2581"

# One piece per word, per punctuation mark, per newline; the space before a piece stays attached to it.
_PIECE = rf"{SPACE}?[A-Za-z0-9]+|{SPACE}?[^A-Za-z0-9{SPACE}]|{SPACE}"


def words_of(texts):
    """The distinct words and punctuation marks of `texts`, in order of first appearance."""
    seen = {}
    for text in texts:
        for piece in re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9 ]", text):
            seen.setdefault(piece, None)
    return list(seen)


def build_tokenizer(words, image_token_index: int | None = None, appended=()):
    """A tokenizers.Tokenizer over `words` (plain strings such as "red", "?" or "\\n") with PaliGemma's special tokens.

    Ids: `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, then each word bare and with a leading "▁", then "▁",
    then `<image>`, `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`; or, with `image_token_index`, the loc and seg
    tokens just below it and `<image>` at it, where PaliGemma's own vocabulary has them (benchmark models).
    `appended` words (bare and with "▁") come last, after the seg tokens: a vocabulary extended that way keeps every
    id it had, so a model trained on it can be extended and fine-tuned.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        for piece in (word, SPACE + word):
            vocab.setdefault(piece, len(vocab))
    vocab.setdefault(SPACE, len(vocab))
    if image_token_index is not None:
        loc_start = image_token_index - len(SEG_TOKENS) - len(LOC_TOKENS)
        vocab.update({token: loc_start + i for i, token in enumerate(LOC_TOKENS + SEG_TOKENS)})
        vocab[IMAGE_TOKEN] = image_token_index
    elif appended:  # every id explicit in the model's vocabulary, so that the appended ones follow the seg tokens
        for token in (IMAGE_TOKEN, *LOC_TOKENS, *SEG_TOKENS):
            vocab[token] = len(vocab)
    for word in appended:
        for piece in (word, SPACE + word):
            if piece in vocab:
                raise ValueError(f"appended word {piece!r} is in the vocabulary already (id {vocab[piece]})")
            vocab[piece] = max(vocab.values()) + 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in LOC_TOKENS + SEG_TOKENS])
    return tokenizer


def shapes_words():
    """Every word of the shapes task's prompts and answers, plus the newline that ends a prompt."""
    from shapes import scenes

    texts = [scenes.CAPTION_PROMPT, scenes.COUNT_PROMPT, "a , and ; \n 0 1 2 3"]
    texts += [scenes.color_count_prompt(c) for c in scenes.COLORS]
    texts += [scenes.detect_prompt(scenes.SHAPES), " ".join(scenes.SHAPES)]
    return words_of(texts)


# Words the task gained after the first checkpoint shipped, appended so that the ids of the shipped model's tokens
# do not move (shapes.train extends its embedding by their rows with --init-from).
APPENDED_WORDS = ("segment",)


def build_shapes_tokenizer(appended=APPENDED_WORDS):
    """The shapes task's tokenizer; `appended=()` gives the vocabulary of the first shipped checkpoint (1,210)."""
    return build_tokenizer(shapes_words(), appended=appended)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="path of the tokenizer.json to write")
    args = parser.parse_args(argv)
    tokenizer = build_shapes_tokenizer()
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
