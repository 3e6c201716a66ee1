"""Whether a file holds the bytes the exporter wrote: its sha256 against the manifest's, computed once per file
identity.

Hashing a 3B export's weights (12 GB) takes tens of seconds, too long for every start. A verdict is remembered,
in this process and in `verified.json` under the export cache, keyed by the file's resolved path and its identity:
device, inode, size, modification and change times. Any write to the file changes its change time (which no
program can set back), and replacing it changes the inode, so a remembered verdict never covers other bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_ENV = "PALIGEMMA_ONNX_CACHE"
DEFAULT_CACHE = "~/.cache/paligemma-onnx"
VERDICTS_NAME = "verified.json"
MAX_VERDICTS = 512  # the most recent ones are kept
PROGRESS_BYTES = 1 << 28  # a progress bar for files larger than this
_lock = threading.Lock()
_memo: dict[str, tuple] = {}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def file_sha256(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"verifying {path.name}",
                                     disable=not progress or size < PROGRESS_BYTES) as bar:
        while block := f.read(1 << 24):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def identity(path: Path) -> tuple:
    status = path.stat()
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns


def has_sha256(path: Path, expected: str, progress: bool = True) -> bool:
    """Whether the file at `path` hashes to `expected`, hashing it only when no verdict covers its identity."""
    key = str(Path(path).resolve())
    seen = (*identity(path), expected)
    with _lock:
        if _memo.get(key) == seen or _stored_verdicts().get(key) == list(seen):
            _memo[key] = seen
            return True
    if file_sha256(Path(path), progress) != expected:
        return False
    if identity(path) != seen[:-1]:  # written to while it was being hashed: the hash speaks for no bytes in particular
        return False
    with _lock:
        _memo[key] = seen
        _store_verdict(key, list(seen))
    return True


def _stored_verdicts() -> dict:
    try:
        verdicts = json.loads((cache_root() / VERDICTS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return verdicts if isinstance(verdicts, dict) else {}


def _store_verdict(key: str, seen: list) -> None:
    """Adds a verdict to verified.json (written whole and renamed into place, so a reader never sees half a file);
    a cache that cannot be written only costs a hash at the next start."""
    verdicts = _stored_verdicts()
    verdicts.pop(key, None)
    verdicts[key] = seen
    verdicts = dict(list(verdicts.items())[-MAX_VERDICTS:])
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=root, prefix=".verified-", delete=False) as file:
            json.dump(verdicts, file)
        os.replace(file.name, root / VERDICTS_NAME)
    except OSError as e:
        logger.info("could not remember the verification in %s (%s); the next load hashes again", root, e)
