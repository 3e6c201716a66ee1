"""Synthetic scenes for the embedded demo model, and the task strings PaliGemma is trained on.

The task card: a 224 x 224 RGB canvas on a plain white or light-gray background holding 1 to 3 shapes (circle,
square, triangle pointing up), each filled in red, green, blue or yellow, 40 to 90 px across, not overlapping,
their horizontal centers at least 20 px apart.

Boxes are (y_min, x_min, y_max, x_max) in continuous pixel coordinates: a square drawn over the pixels
x0 .. x0 + size - 1 has x_min = x0 and x_max = x0 + size. They become location tokens as paligemma.locations
encodes them (a pixel coordinate c on a side of length L is the bin round(c / L * 1023)); `box_from_bins` inverts
that with bin / 1023 * L (decoding with bin / 1024 * L, as the Hugging Face demo does, differs by at most 0.22 px
on a 224 px side).
"""

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from paligemma import locations as L

CANVAS = 224
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
}
MIN_SIZE, MAX_SIZE = 40, 90
MIN_CENTER_GAP = 20


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    box: tuple  # (y_min, x_min, y_max, x_max) in pixels

    @property
    def center_x(self):
        return (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    image: Image.Image
    shapes: tuple  # Shape objects, left to right


def _overlaps(a, b):
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _place(rng, count):
    """Boxes for `count` shapes obeying the card, by rejection sampling (restarts if it gets stuck)."""
    while True:
        boxes = []
        for _ in range(200):
            size = rng.randint(MIN_SIZE, MAX_SIZE)
            y0, x0 = rng.randint(0, CANVAS - size), rng.randint(0, CANVAS - size)
            box = (y0, x0, y0 + size, x0 + size)
            center_x = x0 + size / 2
            if all(not _overlaps(box, b) and abs(center_x - (b[1] + b[3]) / 2) >= MIN_CENTER_GAP for b in boxes):
                boxes.append(box)
                if len(boxes) == count:
                    return boxes


@dataclass(frozen=True)
class Style:
    """How a scene is drawn, beyond the task card's exact colours: what a user's own drawing of the card varies.
    The geometry (shapes, boxes, order) is the scene's whatever the style, so its answers are unchanged."""

    background: tuple = (255, 255, 255)  # RGB
    shifts: tuple = ()  # per shape (left to right), an RGB shift of its colour; () for none
    canvas: int = CANVAS  # side of the drawn image; boxes scale with it, so their locations are the same
    antialias: bool = False  # drawn at twice the size and downscaled: soft edges
    noise: float = 0.0  # standard deviation of Gaussian pixel noise


MAX_SHIFT = 12  # per channel: the "shifted" renderer


def shifted_style(rng, count):
    """The held-out shifted renderer: each shape's colour shifted by up to MAX_SHIFT per channel, and a light
    background of any colour (every channel in 215..255), drawn otherwise as the card says."""
    return Style(background=tuple(rng.randint(215, 255) for _ in range(3)),
                 shifts=tuple(tuple(rng.randint(-MAX_SHIFT, MAX_SHIFT) for _ in range(3)) for _ in range(count)))


def training_style(rng, count):
    """A training scene's random style: white or gray half the time as the card draws them, else a light colour;
    shifted shades for two scenes in three; antialiased edges, a canvas from 0.8 to 1.2 times the card's, and slight
    noise, each for about half the scenes."""
    gray = rng.choice([255, rng.randint(215, 245)])
    background = (gray,) * 3 if rng.random() < 0.5 else tuple(rng.randint(215, 255) for _ in range(3))
    shifts = tuple(tuple(rng.randint(-MAX_SHIFT, MAX_SHIFT) for _ in range(3)) for _ in range(count)) \
        if rng.random() < 2 / 3 else ()
    canvas = round(CANVAS * rng.uniform(0.8, 1.2)) if rng.random() < 0.5 else CANVAS
    return Style(background, shifts, canvas, antialias=rng.random() < 0.5,
                 noise=rng.uniform(0.0, 4.0) if rng.random() < 0.5 else 0.0)


def shade(color, shift=(0, 0, 0)):
    """The RGB of `color` shifted by `shift`, clipped to 0..255."""
    return tuple(min(255, max(0, c + d)) for c, d in zip(COLORS[color], shift))


def _draw(draw, shape, color, box, rgb=None):
    y0, x0, y1, x1 = box
    rgb = rgb or COLORS[color]
    if shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    else:  # triangle pointing up: apex at the top middle, base along the bottom edge
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=rgb)


def _background_and_count(rng):
    """A scene's first draws: its background gray level and its number of shapes."""
    background = rng.choice([255, 255, rng.randint(215, 245)])
    return background, rng.randint(1, 3)


def shape_count(seed, index=0):
    """How many shapes the scene `index` of the stream `seed` holds, without drawing it."""
    return _background_and_count(random.Random(f"shapes:{seed}:{index}"))[1]


def render_scene(seed, index=0, style=None):
    """The scene number `index` of the stream `seed`; the same (seed, index) always gives the same scene.
    `style(rng, number of shapes)` -> Style, if given, draws it otherwise (see Style; the shapes are the same)."""
    rng = random.Random(f"shapes:{seed}:{index}")
    background, count = _background_and_count(rng)
    shapes = [Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), box) for box in _place(rng, count)]
    shapes = tuple(sorted(shapes, key=lambda s: s.center_x))
    if style is None:
        image = Image.new("RGB", (CANVAS, CANVAS), (background,) * 3)
        draw = ImageDraw.Draw(image)
        for s in shapes:
            _draw(draw, s.shape, s.color, s.box)
    else:
        image = draw_styled(shapes, style(random.Random(f"style:{seed}:{index}"), count),
                            np.random.default_rng([seed, index]))
    return Scene(image, shapes)


def draw_styled(shapes, style, noise_rng):
    """The image of `shapes` drawn in `style`."""
    scale = (2 if style.antialias else 1) * style.canvas / CANVAS
    side = round(CANVAS * scale)
    image = Image.new("RGB", (side, side), style.background)
    draw = ImageDraw.Draw(image)
    for i, s in enumerate(shapes):
        box = tuple(round(c * scale) for c in s.box)
        _draw(draw, s.shape, s.color, box, shade(s.color, style.shifts[i] if style.shifts else (0, 0, 0)))
    if style.antialias:
        image = image.resize((style.canvas, style.canvas), Image.Resampling.BOX)
    if style.noise:
        pixels = np.asarray(image, dtype=np.float32) + noise_rng.normal(0.0, style.noise, (style.canvas,) * 2 + (3,))
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


def render_scenes(seed, count, style=None):
    return [render_scene(seed, i, style) for i in range(count)]


# ---- task strings -------------------------------------------------------------------------------

CAPTION_PROMPT = "caption en"
COUNT_PROMPT = "answer en how many shapes are there?"


def color_count_prompt(color):
    return f"answer en how many {color} shapes are there?"


def detect_prompt(names):
    return "detect " + " ; ".join(names)


def caption(scene):
    parts = [f"a {s.color} {s.shape}" for s in scene.shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def count_answer(scene, color=None):
    return str(sum(1 for s in scene.shapes if color is None or s.color == color))


def to_bin(coord, side=CANVAS):
    """The location bin of a pixel coordinate on a side of `side` pixels."""
    return L.to_bin(coord / side)


def box_from_bins(bins, side=CANVAS):
    """Pixel coordinates on a side of `side` pixels of location bins."""
    return tuple(L.from_bin(b) * side for b in bins)


def detect_answer(scene, names):
    """Every shape whose kind is in `names`, left to right, as `<locY1><locX1><locY2><locX2> kind`, joined by " ; "."""
    return " ; ".join(f"{L.box_tokens(s.box, CANVAS, CANVAS)} {s.shape}" for s in scene.shapes if s.shape in names)


def segment_prompt(names):
    return "segment " + " ; ".join(names)


def segment_answer(scene, names, codes):
    """Every shape whose kind is in `names`, left to right, as its box's location tokens, the 16 codes of its mask
    (`codes[i]` for scene.shapes[i]: shapes.vqvae.scene_codes) and its kind, joined by " ; "."""
    return " ; ".join(L.box_tokens(s.box, CANVAS, CANVAS) + "".join(L.SEG_TOKENS[c] for c in row) + f" {s.shape}"
                      for s, row in zip(scene.shapes, codes) if s.shape in names)


def absent_kinds(scene):
    """The kinds not in `scene`, in the card's order."""
    return [k for k in SHAPES if k not in {s.shape for s in scene.shapes}]


def detect_prompts():
    """Every detection prompt the task uses: one kind, or two different kinds."""
    singles = [(a,) for a in SHAPES]
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    return singles + pairs


def task_pairs(scene):
    """All (prefix, suffix) pairs of the task for one scene: caption, both count questions, every detection prompt."""
    pairs = [(CAPTION_PROMPT, caption(scene)), (COUNT_PROMPT, count_answer(scene))]
    pairs += [(color_count_prompt(c), count_answer(scene, c)) for c in COLORS]
    pairs += [(detect_prompt(names), detect_answer(scene, names)) for names in detect_prompts()]
    return pairs
