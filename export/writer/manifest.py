"""What identifies an export and its source: config hash, the manifest (which records the checkpoint's weights
fingerprint, paligemma.checkpoint), and the checks that turn a stale, missing or corrupt export into an error naming
the file."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import onnx

from paligemma.config import PaliGemmaConfig
from paligemma.errors import OnnxExportError, shown

from .integrity import sha256_of

EXPORTER_VERSION = "3"  # bump when the graphs' contract or layout changes
MANIFEST_NAME = "manifest.json"
SHARED_DATA_NAME = "decoder.onnx.data"  # weights of prefill.onnx and decode.onnx, stored once
METADATA_PREFIX = "paligemma."


def config_hash(config: PaliGemmaConfig) -> str:
    """sha256 of the normalized config (every field the model is built from), so a config.json that differs only in
    formatting or unused keys hashes the same."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


REDO = "; export again with `python -m export --model <checkpoint> --output <dir>`"


def read_manifest(onnx_dir: Path) -> dict:
    """manifest.json, checked to have the fields and types a loader reads (file names plain, sizes whole numbers,
    each shared tensor inside its data file); OnnxExportError otherwise."""
    path = Path(onnx_dir) / MANIFEST_NAME
    if not path.is_file():
        raise OnnxExportError(f"{path} is missing: {onnx_dir} is not a complete export; run `python -m export` again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise OnnxExportError(f"{path} is not valid JSON ({e}); the export is corrupt{REDO}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise OnnxExportError(f"{path} is corrupt: {problem}{REDO}")
    return manifest


def manifest_problem(manifest) -> str | None:
    def whole(value, low=0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    if not isinstance(manifest, dict):
        return "it is not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return "it lists no files"
    for name, entry in files.items():
        if Path(name).name != name or name in (".", "..") or "\\" in name:
            return f"the file name {shown(name)} is not a plain name inside the export folder"
        if not isinstance(entry, dict) or not whole(entry.get("size")) or not isinstance(entry.get("sha256"), str):
            return f"the entry of {name} lacks a size or a sha256"
    shared = manifest.get("shared_data")
    if not isinstance(shared, dict) or shared.get("file") not in files or not isinstance(shared.get("tensors"), dict):
        return "shared_data does not name a listed data file and its tensors"
    size = files[shared["file"]]["size"]
    for name, entry in shared["tensors"].items():
        if not isinstance(entry, dict) or not all(whole(entry.get(k)) for k in ("offset", "length", "data_type")):
            return f"the shared tensor {shown(name)} lacks an offset, length or data type"
        if entry["offset"] + entry["length"] > size:
            return f"the shared tensor {shown(name)} lies past the end of {shared['file']} ({size} bytes)"
        shape = entry.get("shape")
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(entry["data_type"]).itemsize
        except (KeyError, ValueError, TypeError):
            return f"the shared tensor {shown(name)} has the unknown data type {entry['data_type']}"
        if (not isinstance(shape, list) or not all(whole(d) for d in shape)
                or math.prod(shape) * itemsize != entry["length"]):
            return f"the shared tensor {shown(name)} has a shape that does not fill its {entry['length']} bytes"
    return None


def check_export(onnx_dir: Path, config: PaliGemmaConfig, fingerprint: str | None = None,
                 progress: bool = True) -> dict:
    """The manifest of an export made from this config (and these weights, when a fingerprint is given), after
    checking that every file it lists is there with its recorded size and sha256 (hashed once per file identity:
    export/writer/integrity.py). Raises OnnxExportError naming the first problem."""
    onnx_dir = Path(onnx_dir)
    manifest = read_manifest(onnx_dir)
    redo = REDO
    if manifest.get("exporter_version") != EXPORTER_VERSION:
        raise OnnxExportError(f"{onnx_dir / MANIFEST_NAME} was written by exporter version "
                              f"{manifest.get('exporter_version')}, this runtime reads version "
                              f"{EXPORTER_VERSION}{redo}")
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
        if not path.is_file():
            raise OnnxExportError(f"{path} is not a file: the export is damaged{redo}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise OnnxExportError(f"{path} is corrupt: {size} bytes where the export wrote {entry['size']} "
                                  f"(truncated or overwritten){redo}")
        if sha256_of(path, progress) != entry["sha256"]:
            raise OnnxExportError(f"{path} is corrupt: its sha256 differs from the one in {MANIFEST_NAME} "
                                  f"(overwritten, or another export's file){redo}")
    return manifest
