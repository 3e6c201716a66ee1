"""A checkpoint is resolved once per load: the folder (or Hub repo id) becomes one paligemma.Checkpoint, its config.json
read once and its weights fingerprinted at most once, and everything below the entry point takes that object. Counted
with spies that wrap the real functions (they still run), wherever a module of the project has imported them."""

import sys
from pathlib import Path

import pytest

import paligemma
from paligemma import checkpoint as checkpoint_module
from paligemma.config import PaliGemmaConfig

PROJECT = ("paligemma", "export", "demo", "bench", "shapes")


def spy(monkeypatch, module, name: str) -> list:
    """Wraps `module.name` in every loaded module of the project that holds it (a module imported later takes the
    wrapper from `module`); returns the list of the first arguments it is called with."""
    real, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").split(".")[0] in PROJECT and getattr(loaded, name, None) is real:
            monkeypatch.setattr(loaded, name, counted)
    return calls


@pytest.fixture
def counts(monkeypatch):
    """(resolutions, config.json reads, fingerprints), each a list that grows as the calls happen."""
    read = PaliGemmaConfig.from_json_file.__func__
    reads = []

    def counted_read(cls, path):
        reads.append(Path(path))
        return read(cls, path)

    monkeypatch.setattr(PaliGemmaConfig, "from_json_file", classmethod(counted_read))
    return (spy(monkeypatch, checkpoint_module, "resolve_checkpoint"), reads,
            spy(monkeypatch, checkpoint_module, "weights_fingerprint"))


def test_a_checkpoint_resolves_to_itself(reference_factory):
    folder, _ = reference_factory("pg1")
    checkpoint = paligemma.Checkpoint.resolve(folder)
    assert paligemma.Checkpoint.resolve(checkpoint) is checkpoint
    assert checkpoint.folder == folder and checkpoint.weight_files == tuple(sorted(folder.glob("*.safetensors")))


def test_the_spies_count_a_resolution(reference_factory, counts):
    folder, _ = reference_factory("pg1")
    checkpoint = paligemma.Checkpoint.resolve(folder)
    assert checkpoint.fingerprint == checkpoint.fingerprint  # computed once, then kept
    assert counts == ([folder], [folder / "config.json"], [checkpoint.weight_files])


def test_loading_the_demo_backend_resolves_the_checkpoint_and_reads_its_config_once(reference_factory, counts,
                                                                                   tmp_path, monkeypatch):
    from demo.backends import load_backend
    from export.writer.integrity import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder, _ = reference_factory("pg1")
    resolved, reads, fingerprints = counts
    # First use: exported into the cache and validated (the torch reference reads the folder in a child process of
    # its own, which no spy here sees), then served.
    for first_use in (True, False):
        backend = load_backend(str(folder), "onnx", warm_up=False)
        assert backend.name == "onnx" and backend.fallback is None
        assert (resolved, reads, len(fingerprints)) == ([str(folder)], [folder / "config.json"], 1), first_use
        del resolved[:], reads[:], fingerprints[:]
    backend.reference()  # eager torch on the same checkpoint, for the check against torch: nothing read again
    torch_backend = load_backend(str(folder), "torch", warm_up=False)
    assert torch_backend.name == "torch"
    assert (resolved, reads, fingerprints) == ([str(folder)], [folder / "config.json"], [])
