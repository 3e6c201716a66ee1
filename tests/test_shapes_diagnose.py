"""shapes.diagnose: teacher-forced exactness as at inference is greedy decoding's exactness where every token
is scored, so on the caption and the counts it must equal what the evaluation measures by generating."""

import torch

import paligemma
from shapes import diagnose as D
from shapes import evaluate as E
from shapes import scenes as S


def test_teacher_forced_exactness_equals_the_evaluations_greedy_accuracy():
    pipe = paligemma.load(dtype=torch.float32)
    # Weights perturbed so that the model gets a fair share wrong: equal rates then mean the same answers.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn_like(p) * p.std() * 0.6)
    scene_list = S.render_scenes(7, 24)
    exact, coordinates = D.teacher_forced(pipe.model.eval(), pipe.processor, D.questions(scene_list))
    texts = lambda images, prompts: [r.text for r in pipe.generate(images, prompts,  # noqa: E731
                                                                   max_new_tokens=E.max_new_tokens())]
    metrics = E.evaluate(texts, scene_list)
    assert 0.1 < metrics["caption_accuracy"] < 0.9 and 0.1 < metrics["color_count_accuracy"] < 0.9
    for kind, metric in [("caption", "caption_accuracy"), ("count", "count_accuracy"),
                         ("color count", "color_count_accuracy")]:
        inference, _, n = exact[kind]
        assert inference / n == metrics[metric], kind
    assert sum(n for _, _, n in exact.values()) == sum(len(E.requests(s, i)) for i, s in enumerate(scene_list))
    assert all(0.0 <= share <= 1.0 for share in coordinates) and len(coordinates) == 4


def test_command_prints_every_task(capsys):
    D.main(["--num-scenes", "6", "--seed", "3"])
    out = capsys.readouterr().out
    for task in ("caption", "count", "color count", "detect, ", "y_min"):
        assert task in out
