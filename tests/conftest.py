import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import build_reference, rewrite_layout


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch takes its share of the cores rather than all of them: two workers
    with two threads each on two cores would wait on each other's threads."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


VARIANTS = {
    # name: (kind, weight std, config overrides); the std keeps greedy runs from repeating one token
    "pg1": ("pg1", 0.2, {}),
    "pg1_mqa": ("pg1", 0.2, {"text": {"num_key_value_heads": 1}}),
    "pg2": ("pg2", 0.1, {}),  # sliding window 6, shorter than every prompt
    "pg2_more_image_tokens": ("pg2", 0.1, {"vision": {"image_size": 56}}),  # 16 image tokens
}


@pytest.fixture(scope="session")
def reference_factory(tmp_path_factory):
    """(variant, layout) -> (folder, transformers model); built once per session."""
    built = {}

    def make(variant="pg1", layout="tf5"):
        if (variant, layout) not in built:
            if (variant, "tf5") not in built:
                kind, std, overrides = VARIANTS[variant]
                folder = tmp_path_factory.mktemp(f"{variant}_tf5")
                built[variant, "tf5"] = (folder, build_reference(folder, kind, std=std, **overrides))
            source, model = built[variant, "tf5"]
            if layout != "tf5":
                folder = tmp_path_factory.mktemp(f"{variant}_{layout}")
                shutil.copytree(source, folder, dirs_exist_ok=True)
                rewrite_layout(folder, layout)
                built[variant, layout] = (folder, model)
        return built[variant, layout]

    return make


def random_image(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def images():
    return [random_image(1), random_image(2, 64, 48), random_image(3, 17, 90)]


@pytest.fixture(scope="session")
def backend():
    """What the demo app serves by default: the embedded model on ONNX Runtime, loaded once per test session."""
    from demo.backends import load_backend

    return load_backend(None, "onnx")


@pytest.fixture(scope="session")
def server(backend):
    """(app, url): the demo app for `backend`, served in-process on a free port."""
    from app_server import serve

    with serve(backend) as (app, url):
        yield app, url
