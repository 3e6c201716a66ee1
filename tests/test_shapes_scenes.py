"""The scene generator follows the task card and is deterministic; the task strings have the card's format."""

import itertools
import random

import numpy as np
import pytest

from shapes import scenes as S

SCENES = S.render_scenes(seed=7, count=300)


def test_same_seed_same_scene_and_other_seeds_differ():
    for index in (0, 1, 17):
        a, b = S.render_scene(3, index), S.render_scene(3, index)
        assert a.shapes == b.shapes
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [S.render_scene(3, i).shapes for i in range(10)] != [S.render_scene(4, i).shapes for i in range(10)]


def test_shape_count_is_the_drawn_scene_s_without_drawing_it():
    counts = [S.shape_count(5, index) for index in range(300)]
    assert counts == [len(S.render_scene(5, index).shapes) for index in range(300)]
    assert set(counts) == {1, 2, 3}


def test_scenes_obey_the_card():
    counts = set()
    for scene in SCENES:
        assert scene.image.size == (224, 224) and scene.image.mode == "RGB"
        assert 1 <= len(scene.shapes) <= 3
        counts.add(len(scene.shapes))
        for s in scene.shapes:
            y0, x0, y1, x1 = s.box
            assert s.shape in ("circle", "square", "triangle") and s.color in ("red", "green", "blue", "yellow")
            assert 40 <= x1 - x0 <= 90 and 40 <= y1 - y0 <= 90
            assert 0 <= x0 and 0 <= y0 and x1 <= 224 and y1 <= 224
        for a, b in itertools.combinations(scene.shapes, 2):
            assert abs(a.center_x - b.center_x) >= 20
            apart = a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
            assert apart, (a, b)
        assert [s.center_x for s in scene.shapes] == sorted(s.center_x for s in scene.shapes)
    assert counts == {1, 2, 3}


def test_background_is_white_or_light_gray():
    for scene in SCENES[:50]:
        corner_values = {scene.image.getpixel(p) for p in [(0, 0), (223, 0), (0, 223), (223, 223)]}
        covered = any(s.box[0] == 0 or s.box[1] == 0 or s.box[2] == 224 or s.box[3] == 224 for s in scene.shapes)
        if not covered:
            (r, g, b), = corner_values
            assert r == g == b >= 215


@pytest.mark.parametrize("index", range(40))
def test_drawn_pixels_match_the_boxes(index):
    """Each shape's pixels lie inside its box and reach its edges (within a pixel for the slanted triangle)."""
    scene = SCENES[index]
    pixels = np.asarray(scene.image).astype(int)
    for s in scene.shapes:
        mask = (np.abs(pixels - np.array(S.COLORS[s.color])).sum(-1) == 0)
        ys, xs = np.nonzero(mask)
        y0, x0, y1, x1 = s.box
        inside = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
        assert inside.sum() > 0.4 * (y1 - y0) * (x1 - x0)
        ys, xs = ys[inside], xs[inside]
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        center = pixels[(y0 + y1) // 2 + (y1 - y0) // 6, (x0 + x1) // 2]
        assert tuple(center) == S.COLORS[s.color]


def scene_of(*specs):
    shapes = tuple(S.Shape(shape, color, box) for shape, color, box in specs)
    return S.Scene(image=None, shapes=shapes)


def test_captions_and_counts_follow_the_card():
    one = scene_of(("circle", "red", (10, 10, 60, 60)))
    two = scene_of(("circle", "red", (10, 10, 60, 60)), ("square", "blue", (100, 100, 150, 150)))
    three = scene_of(("circle", "red", (10, 10, 60, 60)), ("square", "blue", (100, 100, 150, 150)),
                     ("triangle", "yellow", (10, 160, 60, 210)))
    assert S.caption(one) == "a red circle"
    assert S.caption(two) == "a red circle and a blue square"
    assert S.caption(three) == "a red circle, a blue square and a yellow triangle"
    assert S.count_answer(three) == "3"
    assert [S.count_answer(three, c) for c in ("red", "green", "blue", "yellow")] == ["1", "0", "1", "1"]


def test_detection_answers():
    scene = scene_of(("circle", "green", (150, 10, 200, 60)), ("circle", "red", (0, 0, 56, 112)),
                     ("square", "blue", (112, 112, 224, 224)))  # left to right, as render_scene orders them
    assert S.detect_answer(scene, ["square"]) == "<loc0512><loc0512><loc1023><loc1023> square"
    assert S.detect_answer(scene, ["triangle"]) == ""
    # Every match left to right (the scene's order), each labelled, joined by " ; ".
    assert S.detect_answer(scene, ["circle", "square"]) == (
        "<loc0685><loc0046><loc0913><loc0274> circle ; <loc0000><loc0000><loc0256><loc0512> circle ; "
        "<loc0512><loc0512><loc1023><loc1023> square"
    )
    assert S.detect_prompt(["circle", "square"]) == "detect circle ; square"


def test_bins_round_trip_within_a_quarter_pixel():
    for c in np.linspace(0, 224, 897):
        assert abs(S.box_from_bins([S.to_bin(c)])[0] - c) <= 224 / 1023 / 2 + 1e-9


def painted(image, background):
    return (np.asarray(image).astype(int) != np.array(background)).any(-1)


@pytest.mark.parametrize("style", [S.shifted_style, S.training_style])
def test_a_styled_scene_holds_the_same_shapes(style):
    for index in range(30):
        assert S.render_scene(3, index, style).shapes == S.render_scene(3, index).shapes
    a, b = S.render_scene(3, 5, style), S.render_scene(3, 5, style)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))  # deterministic too


def test_shifted_scenes_move_each_colour_at_most_12_per_channel_on_a_light_background():
    from shapes.vqvae import shape_mask

    shifts = set()
    for index in range(40):
        scene = S.render_scene(1, index, S.shifted_style)
        style = S.shifted_style(random.Random(f"style:1:{index}"), len(scene.shapes))
        pixels = np.asarray(scene.image).astype(int)
        assert min(style.background) >= 215 and scene.image.size == (224, 224)
        union = np.zeros(pixels.shape[:2], dtype=bool)
        for shape, shift in zip(scene.shapes, style.shifts):
            mask = shape_mask(shape.shape, shape.box)
            union |= mask
            colour = pixels[mask]
            assert (colour == colour[0]).all()  # one flat colour, within 12 of the card's
            assert np.abs(colour[0] - np.array(S.COLORS[shape.color])).max() <= S.MAX_SHIFT
            shifts.add(tuple(colour[0] - np.array(S.COLORS[shape.color])))
        np.testing.assert_array_equal(painted(scene.image, style.background), union)  # the card's pixels exactly
    assert len(shifts) > 30


def test_training_styles_draw_the_shapes_where_their_boxes_are():
    from shapes.vqvae import shape_mask

    for index in range(40):
        scene = S.render_scene(0, index, S.training_style)
        style = S.training_style(random.Random(f"style:0:{index}"), len(scene.shapes))
        assert scene.image.size == (style.canvas, style.canvas) and 179 <= style.canvas <= 269
        # Back on the card's canvas, the drawn pixels are the scene's shapes up to the edges that scaling,
        # soft edges and noise blur: the truth and the drawing disagree on a thin band only.
        drawn = np.asarray(scene.image.resize((224, 224)).convert("RGB")).astype(int)
        far = (np.abs(drawn - np.array(style.background)).max(-1) > 40)
        union = np.zeros(far.shape, dtype=bool)
        for shape in scene.shapes:
            union |= shape_mask(shape.shape, shape.box)
        disagree = (far != union).sum() / max(1, union.sum())
        assert disagree < 0.12, (index, style, disagree)


def test_segment_answers_list_the_asked_kinds_with_their_codes():
    scene = scene_of(("circle", "green", (150, 10, 200, 60)), ("square", "blue", (112, 112, 224, 224)))
    codes = [list(range(16)), [127] * 16]
    assert S.segment_prompt(["circle", "square"]) == "segment circle ; square"
    assert S.segment_answer(scene, ["square"], codes) == (
        "<loc0512><loc0512><loc1023><loc1023>" + "<seg127>" * 16 + " square")
    assert S.segment_answer(scene, ["circle", "square"], codes) == (
        "<loc0685><loc0046><loc0913><loc0274>" + "".join(f"<seg{i:03d}>" for i in range(16)) + " circle ; "
        "<loc0512><loc0512><loc1023><loc1023>" + "<seg127>" * 16 + " square")
    assert S.segment_answer(scene, ["triangle"], codes) == ""
    assert S.absent_kinds(scene) == ["triangle"]
