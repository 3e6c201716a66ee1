"""shapes.vqvae: the masks it learns are the renderer's pixels, and what it saves loads as a mask decoder."""

import random

import numpy as np
import torch
from safetensors.torch import save_file

from paligemma import MaskDecoder, parse_detections, parse_segmentations
from paligemma.mask_decoder import MaskDecoderConfig
from shapes import scenes as S
from shapes.scenes import segment_prompt
from shapes.vqvae import ShapesVQVAE, box_mask, random_example, segment_answer, shape_mask


def test_shape_masks_are_the_pixels_the_scene_paints():
    scene = S.render_scene(0, 3)
    background = np.asarray(scene.image)[0, 0]
    painted = (np.asarray(scene.image) != background).any(-1)
    union = np.zeros_like(painted)
    for shape in scene.shapes:
        union |= shape_mask(shape.shape, shape.box)
    np.testing.assert_array_equal(union, painted)


def test_a_square_fills_its_box_mask():
    mask = shape_mask("square", (10, 20, 60, 70))
    assert box_mask(mask, (10, 20, 60, 70)).min() == 1.0
    assert box_mask(mask, (10, 20, 60, 70)).shape == (64, 64)


def test_the_whole_vqvae_file_loads_as_a_mask_decoder(tmp_path):
    model = ShapesVQVAE(MaskDecoderConfig(embedding_dim=8, width=16))
    assert {k.split(".")[0] for k in model.state_dict()} == {"_vq_vae", "decoder", "encoder"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "vqvae.safetensors"))
    save_file(model.decoder_state(), str(tmp_path / "mask_decoder.safetensors"))
    codes = np.arange(16)[None] * 5
    for name in ("vqvae.safetensors", "mask_decoder.safetensors"):
        decoder = MaskDecoder.from_file(tmp_path / name)
        np.testing.assert_array_equal(decoder.mask_logits(codes), model.mask_logits(codes))


def test_encoding_gives_sixteen_codes_and_a_loss_that_trains():
    torch.manual_seed(0)
    model = ShapesVQVAE(MaskDecoderConfig(embedding_dim=8, width=16))
    masks = torch.from_numpy(np.stack([random_example(random.Random(i))[1] for i in range(4)]))
    _, codes = model.encode(masks)
    assert codes.shape == (4, 16) and int(codes.max()) < 128
    loss, _ = model.loss(masks)
    loss.backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0 and model._vq_vae._embedding.grad.abs().sum() > 0


def test_segment_answers_read_back_as_the_scene_shapes():
    torch.manual_seed(0)
    model = ShapesVQVAE(MaskDecoderConfig(embedding_dim=8, width=16)).eval()
    def kinds(scene):
        return tuple(dict.fromkeys(x.shape for x in scene.shapes))

    scene = next(s for s in (S.render_scene(0, i) for i in range(50)) if len(kinds(s)) == 2)
    names, [absent] = kinds(scene), [k for k in S.SHAPES if k not in kinds(scene)]
    assert segment_prompt(names) == "segment " + " ; ".join(names)
    text = segment_answer(scene, names, model)
    found = parse_segmentations(text, S.CANVAS, S.CANVAS, model)
    assert [f.label for f in found] == [x.shape for x in scene.shapes]
    assert [d.box for d in parse_detections(text, S.CANVAS, S.CANVAS)] == [f.box for f in found]
    for f, x in zip(found, scene.shapes):  # the box as detection encodes it: within a bin of the truth
        assert np.allclose(f.box, (x.box[1], x.box[0], x.box[3], x.box[2]), atol=S.CANVAS / 1023)
    assert segment_answer(scene, (absent,), model) == ""
