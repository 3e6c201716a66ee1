import json
import subprocess
import sys

from conftest import random_image

import paligemma


def run(*args):
    return subprocess.run([sys.executable, "-m", "paligemma", *args], capture_output=True, text=True, timeout=300)


def test_generate_json_matches_the_library(reference_factory, tmp_path):
    folder, _ = reference_factory("pg2")
    image = tmp_path / "image.png"
    random_image(5).save(image)
    out = run("generate", "--model", str(folder), "--image", str(image), "--prompt", "caption en",
              "--max-new-tokens", "10", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"text", "token_ids", "ttft_s", "decode_tokens_per_s"}
    expected = paligemma.load(folder).generate(str(image), "caption en", max_new_tokens=10)
    assert result["token_ids"] == expected.token_ids
    assert result["text"] == expected.text


def test_sampled_cli_is_repeatable(reference_factory, tmp_path):
    folder, _ = reference_factory("pg1")
    image = tmp_path / "image.png"
    random_image(6).save(image)
    args = ("generate", "--model", str(folder), "--image", str(image), "--prompt", "caption en", "--temperature", "1.0",
            "--top-p", "0.9", "--top-k", "40", "--seed", "11", "--max-new-tokens", "8", "--json")
    assert json.loads(run(*args).stdout)["token_ids"] == json.loads(run(*args).stdout)["token_ids"]


def test_errors_are_one_clear_line(tmp_path):
    out = run("generate", "--model", str(tmp_path), "--image", "nope.png", "--prompt", "caption en")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0
    assert "config.json" in out.stderr


def test_usage_mistakes_are_one_line(tmp_path):
    for args in (("generate", "--prompt", "caption en"),
                 ("generate", "--image", "x.png", "--prompt", "p", "--top-k", "many"),
                 ("nonsense",)):
        out = run(*args)
        assert out.returncode == 2
        assert out.stderr.strip().count("\n") == 0, out.stderr
        assert out.stderr.startswith("python -m paligemma") and "--help" in out.stderr


def test_an_export_folder_with_the_torch_backend_is_refused(tmp_path):
    out = run("generate", "--image", "x.png", "--prompt", "caption en", "--onnx-dir", str(tmp_path))
    assert out.returncode == 1 and "backend 'onnx' only" in out.stderr
