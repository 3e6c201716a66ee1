"""The errors this project raises for its users, in one place: each message says what was wrong and what to do."""

from __future__ import annotations


class InputError(ValueError):
    """Input a user gave that cannot be processed: an image, a prompt, a decoding value."""


class ConfigError(ValueError):
    """A config.json that this implementation cannot build a model from."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded as it is."""


class OnnxExportError(RuntimeError):
    """An export that cannot be made or used as it is; the message names the file."""


def shown(value, limit: int = 60) -> str:
    """`repr(value)`, cut short: a message quotes what it refuses without echoing a megabyte back."""
    text = (repr(value) if not isinstance(value, int) or value.bit_length() < 200
            else f"<an integer of {len(str(value))} digits>")
    return text if len(text) <= limit else text[: limit - 3] + "..."
