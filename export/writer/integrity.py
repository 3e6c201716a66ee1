"""Files' sha256 digests, computed once per file identity: what the manifest records at export and what loading
checks against it.

Hashing a 3B export's weights (12 GB) takes tens of seconds, too long for every start. A digest is remembered, in
this process and in `digests.json` under the export cache, keyed by the file's device and inode, and valid while
its size, modification and change times are those it was hashed at. Any write to the file changes its change time
(which no program can set back), and replacing it changes the inode, so a remembered digest never stands for other
bytes.
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
DIGESTS_NAME = "digests.json"
MAX_DIGESTS = 512  # the most recent ones are kept
PROGRESS_BYTES = 1 << 28  # a progress bar for files larger than this
_lock = threading.Lock()
_memo: dict[str, list] = {}  # device:inode -> [size, mtime_ns, ctime_ns, sha256]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def file_sha256(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                                     disable=not progress or size < PROGRESS_BYTES) as bar:
        while block := f.read(1 << 24):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def identity(path: Path) -> tuple[str, list]:
    """The key a digest is remembered under (device and inode: a renamed folder keeps it) and what must still hold."""
    status = path.stat()
    return f"{status.st_dev}:{status.st_ino}", [status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def sha256_of(path: Path, progress: bool = True) -> str:
    """The file's sha256, hashed only when no digest is remembered for its identity (the exporter's own hashing is
    remembered too, so the first load after an export hashes nothing)."""
    path = Path(path)
    key, state = identity(path)
    with _lock:
        remembered = _memo.get(key) or _stored_digests().get(key)
        if remembered and remembered[:-1] == state:
            _memo[key] = remembered
            return remembered[-1]
    digest = file_sha256(path, progress)
    if identity(path) != (key, state):  # written to while it was being hashed: the digest speaks for no bytes
        return digest
    with _lock:
        _memo[key] = [*state, digest]
        _store_digest(key, [*state, digest])
    return digest


def _stored_digests() -> dict:
    try:
        digests = json.loads((cache_root() / DIGESTS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return digests if isinstance(digests, dict) else {}


def _store_digest(key: str, entry: list) -> None:
    """Adds a digest to the file (written whole and renamed into place, so a reader never sees half a file); a cache
    that cannot be written only costs a hash at the next start."""
    digests = _stored_digests()
    digests.pop(key, None)
    digests[key] = entry
    digests = dict(list(digests.items())[-MAX_DIGESTS:])
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=root, prefix=".digests-", delete=False) as file:
            json.dump(digests, file)
        os.replace(file.name, root / DIGESTS_NAME)
    except OSError as e:
        logger.info("could not remember the digest in %s (%s); the next load hashes again", root, e)
