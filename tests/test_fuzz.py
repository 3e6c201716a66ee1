"""Seeded fuzzing, bounded in count and time: random bytes as images, random unicode prompts and random decoding
values, inside and outside their ranges, through the library and through the app's HTTP API. Every answer is a
result or a clear error naming what was wrong; never another exception, a "Server error" or a hang."""

from __future__ import annotations

import io
import math
import random
import time

import numpy as np
import pytest
from app_server import EXAMPLES, last_event, raw_call, raw_upload
from PIL import Image

import paligemma
from demo import app as demo_app

pytestmark = pytest.mark.skipif(not (paligemma.DEMO_CHECKPOINT / "config.json").exists(),
                                reason="the embedded demo checkpoint is not in the tree yet")
LIBRARY_CASES, API_CASES = 200, 200
TIME_BUDGET_S = 45  # per test: the loop stops early past it (the counts are the bound on a fast machine)
SCENE = (demo_app.EXAMPLES_DIR / EXAMPLES[0]["file"]).read_bytes()
RESERVED = ["<image>", "<bos>", "<eos>", "<pad>", "<loc0001>", "<seg042>", "\n", "\x00", "\ufeff", "\ud800", "\udfff"]


def random_image_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 2000))
    if kind == 1:
        return SCENE[: rng.randrange(len(SCENE))]  # truncated
    if kind == 2:  # a valid PNG with a few bytes flipped
        raw = bytearray(SCENE)
        for _ in range(rng.randrange(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if kind == 3:
        return b"<svg" + rng.randbytes(50)
    buffer = io.BytesIO()
    size = (rng.randrange(1, 300), rng.randrange(1, 300))
    mode = rng.choice(["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK"])
    fmt = ("TIFF" if mode == "CMYK" else rng.choice(["PNG", "GIF", "BMP", "TIFF"]) if mode in ("RGB", "L", "P")
           else "PNG")
    Image.new(mode, size).save(buffer, fmt)
    return buffer.getvalue()


def random_library_image(rng: random.Random):
    if rng.random() < 0.25:
        shape = tuple(rng.randrange(0, 6) for _ in range(rng.randrange(1, 5)))
        dtype = rng.choice([np.uint8, np.float32, np.int64, np.bool_])
        return np.zeros(shape, dtype)
    if rng.random() < 0.05:
        return rng.choice([None, 3, "", "/nonexistent.png", object()])
    if rng.random() < 0.3:
        return Image.open(io.BytesIO(SCENE))
    return random_image_bytes(rng)


def random_prompt(rng: random.Random):
    if rng.random() < 0.05:
        return rng.choice([None, 7, b"caption en", ["caption en"]])
    if rng.random() < 0.3:
        return rng.choice(["caption en", "detect circle ; triangle", "answer en how many shapes are there?"])
    pieces = []
    for _ in range(rng.randrange(0, 12)):
        choice = rng.random()
        if choice < 0.5:
            pieces.append(rng.choice(["caption en", "detect circle", "answer en how many", " ; ", "en"]))
        elif choice < 0.7:
            pieces.append(rng.choice(RESERVED))
        else:
            pieces.append("".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 6))))
    return "".join(pieces)


def random_value(rng: random.Random, low, high):
    return rng.choice([
        rng.uniform(low, high), rng.randint(int(low), int(high)), low, high, -1, 0, 1e-300, 5e-324, high * 10,
        10**40, float("nan"), float("inf"), -float("inf"), None, "1", True, np.float32(rng.uniform(low, high)),
        np.int64(rng.randint(int(low), int(high))),
    ])


def random_decoding(rng: random.Random) -> dict:
    if rng.random() < 0.5:  # values within every range, where the image and the prompt decide
        return dict(max_new_tokens=rng.randint(1, 3), do_sample=rng.random() < 0.5, temperature=rng.uniform(0, 2),
                    top_p=rng.uniform(0.05, 1), top_k=rng.randint(0, 200), seed=rng.randrange(2**63))
    return dict(
        max_new_tokens=rng.choice([1, 2, 3, 0, -1, 10**6, 2.5, None, np.int32(2)]),
        do_sample=rng.random() < 0.6,
        temperature=random_value(rng, 0.0, 2.0),
        top_p=random_value(rng, 0.0, 1.0),
        top_k=random_value(rng, 0, 200),
        seed=rng.choice([None, 0, 7, -3, 2**63, 10**4000, 1.5, np.uint64(5)]),
    )


def is_clear(error: Exception) -> bool:
    message = str(error)
    return isinstance(error, ValueError) and 0 < len(message) <= 600 and "Traceback" not in message


def test_the_library_answers_random_input_with_a_result_or_a_clear_error():
    pipe = paligemma.load()
    rng = random.Random(1234)
    outcomes = {"result": 0, "error": 0}
    deadline = time.monotonic() + TIME_BUDGET_S
    for case in range(LIBRARY_CASES):
        if time.monotonic() > deadline:
            break
        image, prompt, decoding = random_library_image(rng), random_prompt(rng), random_decoding(rng)
        try:
            result = pipe.generate(image, prompt, **decoding)
        except Exception as error:  # noqa: BLE001 - what kind it is, is the test
            assert is_clear(error), f"case {case}: {type(error).__name__}: {error!r:.300}"
            outcomes["error"] += 1
            continue
        assert isinstance(result.text, str) and len(result.token_ids) <= decoding["max_new_tokens"]
        outcomes["result"] += 1
    assert outcomes["result"] > 0 and outcomes["error"] > 0, outcomes  # both sides were reached


def json_safe(value):
    """What a JSON client can send for a value (numpy scalars as plain numbers, nan and inf as JSON allows them)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def test_the_app_answers_random_requests_with_a_result_or_a_message(server):
    url = server[1]
    rng = random.Random(99)
    outcomes = {"complete": 0, "error": 0}
    deadline = time.monotonic() + TIME_BUDGET_S
    for case in range(API_CASES):
        if time.monotonic() > deadline:
            break
        roll = rng.random()
        if roll < 0.7:
            content = SCENE if rng.random() < 0.4 else random_image_bytes(rng)
            image = {"path": raw_upload(url, rng.choice(["x.png", "y.jpg", "z"]), content),
                     "meta": {"_type": "gradio.FileData"}}
        elif roll < 0.85:
            image = {"path": rng.choice(["/etc/hostname", "../../x.png", "data:image/png;base64,AAAA", "", "\x00"])}
        else:
            image = rng.choice([None, 5, {"url": "data:,"}, {}, []])
        decoding = random_decoding(rng)
        prompt = random_prompt(rng)
        data = [image, prompt if not isinstance(prompt, bytes) else None,
                rng.choice(["greedy", "sample"]) if rng.random() < 0.8 else rng.choice(["beam", None, 1]),
                *(json_safe(decoding[k]) for k in ("temperature", "top_p", "top_k")),
                json_safe(decoding["max_new_tokens"]) if rng.random() < 0.7 else rng.randrange(1, 4),
                json_safe(decoding["seed"]), False if rng.random() < 0.8 else rng.choice(["yes", None, True])]
        data = [None if isinstance(v, float) and not math.isfinite(v) else v for v in data]
        events = raw_call(url, data, timeout=120)
        kind, payload = last_event(events)
        assert "Traceback" not in events, f"case {case}: {events[-500:]}"
        if kind == "error":
            assert payload.get("title") != "Server error", f"case {case}: {payload}"
        else:
            assert kind == "complete" and isinstance(payload[0], str), f"case {case}: {events[-500:]}"
        outcomes[kind] += 1
    assert outcomes["complete"] > 0 and outcomes["error"] > 0, outcomes
