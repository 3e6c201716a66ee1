"""What identifies an export and its source: config hash, weights fingerprint, the manifest, and the checks that
turn a stale, missing or corrupt export into an error naming the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from paligemma.config import PaliGemmaConfig
from paligemma.errors import OnnxExportError
from paligemma.weights import weight_files

EXPORTER_VERSION = "1"  # bump when the graphs' contract or layout changes
MANIFEST_NAME = "manifest.json"
SHARED_DATA_NAME = "decoder.onnx.data"  # weights of prefill.onnx and decode.onnx, stored once
METADATA_PREFIX = "paligemma."


def config_hash(config: PaliGemmaConfig) -> str:
    """sha256 of the normalized config (every field the model is built from), so a config.json that differs only in
    formatting or unused keys hashes the same."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def weights_fingerprint(folder: Path, samples: int = 16, chunk: int = 1 << 16) -> str:
    """A fast fingerprint of the checkpoint's weights: names, sizes, safetensors headers and `samples` evenly spaced
    chunks of every file. Two checkpoints with one config (pt and mix, or a fine-tune) fingerprint differently."""
    digest = hashlib.sha256()
    for file in weight_files(Path(folder)):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_length, 1 << 24)))
            for i in range(samples):
                f.seek(size * i // samples)
                digest.update(f.read(chunk))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(onnx_dir: Path) -> dict:
    path = Path(onnx_dir) / MANIFEST_NAME
    if not path.exists():
        raise OnnxExportError(f"{path} is missing: {onnx_dir} is not a complete export; run `python -m export` again")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OnnxExportError(f"{path} is not valid JSON ({e}); the export is corrupt, run `python -m export` again") from None


def check_export(onnx_dir: Path, config: PaliGemmaConfig, fingerprint: str | None = None, verify_data: bool = False) -> dict:
    """The manifest of an export made from this config (and these weights, when a fingerprint is given), after
    checking that every file it lists is there with its recorded size (and hash: .onnx files always, external
    data when `verify_data`). Raises OnnxExportError naming the first problem."""
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    redo = "; export again with `python -m export --model <checkpoint> --output <dir>`"
    if manifest.get("exporter_version") != EXPORTER_VERSION:
        raise OnnxExportError(f"{onnx_dir / MANIFEST_NAME} was written by exporter version "
                              f"{manifest.get('exporter_version')}, this runtime reads version {EXPORTER_VERSION}{redo}")
    expected = config_hash(config)
    if manifest.get("config_hash") != expected:
        raise OnnxExportError(f"{onnx_dir} is stale: its config hash {str(manifest.get('config_hash'))[:12]} (in "
                              f"{MANIFEST_NAME}) does not match the model's config hash {expected[:12]}{redo}")
    if fingerprint is not None and manifest.get("weights_fingerprint") != fingerprint:
        raise OnnxExportError(f"{onnx_dir} was exported from other weights than this checkpoint's (weights "
                              f"fingerprint in {MANIFEST_NAME} differs){redo}")
    for name, entry in manifest["files"].items():
        path = onnx_dir / name
        if not path.exists():
            kind = "external data file" if not name.endswith(".onnx") else "graph"
            raise OnnxExportError(f"{path} is missing: the {kind} of this export is gone{redo}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise OnnxExportError(f"{path} is corrupt: {size} bytes where the export wrote {entry['size']} "
                                  f"(truncated or overwritten){redo}")
        if (name.endswith(".onnx") or verify_data) and file_sha256(path) != entry["sha256"]:
            raise OnnxExportError(f"{path} is corrupt: its sha256 differs from the one in {MANIFEST_NAME}{redo}")
    return manifest
