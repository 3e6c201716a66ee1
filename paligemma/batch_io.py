"""A batch job's inputs and its answers file, without the model: what the Ray driver needs (it starts without torch).

The inputs (`read_items`): a folder (its image files, recursively, by extension; each id the path relative to the
folder), a glob (each id the path relative to the pattern's fixed part), or a JSONL of {"id", "image", "prompt"}
records (a record's prompt overrides the command's).

The answers (`AnswerFile`): one JSON line per input, each written whole in one append; synced to disk every few
seconds and at the end. A rerun with the same file skips the ids it holds, after cutting off a partial last line (a
run killed mid-write), so an interrupted and resumed run ends with the lines of an uninterrupted one (timings aside;
in the order they finished).
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError, shown

logger = logging.getLogger(__name__)

# A folder's files that are read as images, by extension (case ignored): the formats load_image opens.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
DEFAULT_PROMPT = "caption en"
# As the demo app's: a segmentation of the embedded model's three shapes is about 70 tokens. Greedy answers stop at
# <eos>, so a shorter answer costs nothing more.
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_READERS = 2
# The rows of the command's batch on a CPU (where memory allows; serving keeps paligemma's 8), prefilled in groups
# of 16 (batch.py). Measured on the embedded model, 2 cores, 2,000 scenes: 208-245 images/s with groups of 8 or 16 in
# as many rows, 304 with 8 in 16 rows, 331 with 16 in 32, 353-371 with 32 in 64 (docs/datasets.md).
CPU_ROWS = 32
# The answers are synced to disk at most this often (and at the end): a killed process loses nothing written (the
# kernel holds it), a machine that loses power at most this much.
SYNC_INTERVAL_S = 2.0
LINE_KEYS = ("id", "image", "prompt", "text", "token_ids", "boxes", "timings", "error")



@dataclass(frozen=True)
class Item:
    """One input: its id (a string, or an integer from a JSONL), the image as the input names it (written in the
    answer), the path it is read from, and its prompt."""

    id: str | int
    image: str
    path: str
    prompt: str


# ---- inputs ----------------------------------------------------------------------------------------------------------

def read_items(source: str | os.PathLike, prompt: str = DEFAULT_PROMPT) -> list[Item]:
    """The inputs of SOURCE: a folder, a glob, a JSONL file (or one image file). Raises InputError for a source that
    does not exist, holds no images, or a JSONL that is not one record per line with ids of their own."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"--prompt {shown(prompt)} is empty; give a task prompt such as {DEFAULT_PROMPT!r}")
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        return folder_items(path, prompt)
    if path.is_file():
        if path.suffix.lower() in JSONL_EXTENSIONS:
            return jsonl_items(path, prompt)
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return [Item(path.name, text, str(path.resolve()), prompt)]
        raise InputError(f"--input {path_text(text)} is a file that is neither a JSONL of records (.jsonl) nor an "
                         f"image ({', '.join(IMAGE_EXTENSIONS)}); give a folder, a glob, a .jsonl file or an image")
    if glob.has_magic(text):
        return glob_items(text, prompt)
    raise InputError(f"--input {path_text(text)} does not exist; give a folder of images, a glob (quoted, e.g. "
                     f"'photos/**/*.jpg') or a .jsonl file of records")


def path_text(path) -> str:
    """A path as a message quotes it: whole (up to 300 characters), so that the user can find it."""
    return shown(os.fspath(path), 300)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def folder_items(folder: Path, prompt: str) -> list[Item]:
    """Every image file under `folder` (by extension; hidden files and folders skipped), sorted by id."""
    items = []
    for directory, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in files:
            if is_image_name(name):
                path = Path(directory) / name
                items.append(Item(path.relative_to(folder).as_posix(), str(path), str(path.resolve()), prompt))
    if not items:
        raise InputError(f"--input folder {path_text(folder)} holds no image files ({', '.join(IMAGE_EXTENSIONS)}, "
                         "in it or its subfolders); check the path")
    return sorted(items, key=lambda item: item.id)


def glob_items(pattern: str, prompt: str) -> list[Item]:
    """The files the glob matches (`**` reaches into subfolders), each id relative to the pattern's part before its
    first wildcard, sorted by id."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    items = []
    for match in glob.glob(pattern, recursive=True):
        path = Path(match)
        if path.is_file():
            items.append(Item(path.relative_to(base).as_posix(), match, str(path.resolve()), prompt))
    if not items:
        raise InputError(f"--input glob {path_text(pattern)} matches no file; check the pattern (quote it, so that the "
                         "shell does not expand it)")
    return sorted(items, key=lambda item: item.id)


def jsonl_items(path: Path, prompt: str) -> list[Item]:
    """One Item per line of {"image": path (relative to the JSONL's folder), "id": string or integer (default: the
    image as written), "prompt": text (default: `prompt`)}; blank lines skipped."""
    items, lines_of = [], {}
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                item = jsonl_record(line, number, path, prompt)
                if item.id in lines_of:
                    raise InputError(f"{path}: line {number} has the id {shown(item.id)} of line {lines_of[item.id]}; "
                                     "give each record an id of its own")
                lines_of[item.id] = number
                items.append(item)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if not items:
        raise InputError(f"{path} holds no records; write one JSON object per line, e.g. "
                         '{"id": "a", "image": "a.jpg", "prompt": "caption en"}')
    return items


def jsonl_record(line: str, number: int, path: Path, prompt: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {number} is not JSON ({e.msg} at column {e.colno}); write one JSON object per "
                         "line") from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object; write "
                         '{"id": ..., "image": ..., "prompt": ...}')
    image = record.get("image")
    if not isinstance(image, str) or not image:
        raise InputError(f"{path}: line {number} has no \"image\" (a path, relative to the JSONL's folder); got "
                         f"{shown(image)}")
    key = record.get("id", image)
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise InputError(f"{path}: line {number}'s \"id\" is {shown(key)}; use a string or an integer")
    text = record.get("prompt", prompt)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{path}: line {number}'s \"prompt\" is {shown(text)}; use a task prompt, or leave the key "
                         "out for --prompt")
    return Item(key, image, str((path.parent / image).resolve()), text)


# ---- the answers file --------------------------------------------------------------------------------------------

class AnswerFile:
    """The JSONL of answers: the ids it already holds (`answered`), and lines appended whole. A partial last line (a
    run killed while writing it) is cut off when the file is opened. One run at a time (an exclusive lock)."""

    def __init__(self, path: str | os.PathLike, sync_interval_s: float = SYNC_INTERVAL_S):
        self.path = Path(path)
        self.sync_interval_s = sync_interval_s
        folder = self.path.parent
        if not folder.is_dir():
            raise InputError(f"--out {path_text(self.path)}: the folder {path_text(folder)} does not exist; create "
                             "it first (mkdir -p)")
        if self.path.is_dir():
            raise InputError(f"--out {path_text(self.path)} is a folder; give a file name, e.g. answers.jsonl")
        created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"--out {path_text(self.path)} is being written by another run; wait for it, or "
                                 "give another file") from None
            self.answered, self.cut_bytes = self._read()
            if created:
                sync_folder(folder)  # the new file's name survives a power cut too
        except BaseException:
            os.close(self.fd)
            raise
        self.last_sync = time.monotonic()
        self.written = 0

    def _read(self) -> tuple[set, int]:
        with open(self.fd, "rb", closefd=False) as file:
            data = file.read()
        end = data.rfind(b"\n") + 1
        cut = len(data) - end
        if cut:
            logger.warning("%s: cut off a partial last line (%d bytes) left by an interrupted run", self.path, cut)
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        answered = set()
        for number, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                answered.add(record["id"])
            except (ValueError, KeyError, TypeError):
                raise InputError(f"--out {path_text(self.path)}: line {number} is not an answer line of this command "
                                 "(a JSON object with an \"id\"); give another --out, or remove that line") from None
        return answered, cut

    def write(self, line: str) -> None:
        """Appends one answer line (JSON text without its newline) in one write, and syncs when it is time."""
        data = (line + "\n").encode("utf-8")
        while data:  # a regular file takes it whole; a short write (a full disk) is finished or raises
            data = data[os.write(self.fd, data):]
        self.written += 1
        if time.monotonic() - self.last_sync >= self.sync_interval_s:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fd)
        self.last_sync = time.monotonic()

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def answer_line(record: dict) -> str:
    """One answer as its JSON line (keys in LINE_KEYS' order; no newline inside)."""
    return json.dumps({key: record[key] for key in LINE_KEYS}, ensure_ascii=False, allow_nan=False)


def pending_items(items: list[Item], answers: AnswerFile) -> list[Item]:
    """The items whose ids the answers file does not hold yet."""
    pending = [item for item in items if item.id not in answers.answered]
    stray = len(answers.answered) - (len(items) - len(pending))
    if stray:
        logger.info("%s holds %d answer(s) for ids not in this input; they are kept", answers.path, stray)
    return pending


@dataclass
class Summary:
    answered: int = 0
    failed: int = 0
    skipped: int = 0  # already in the answers file
    seconds: float = 0.0  # from the start of answering (the model loaded; on Ray, the cluster reached) to the end
    first_s: float | None = None  # from the start to the first answer (on Ray: the actors' start-up included)
    errors: dict = field(default_factory=dict)  # error message -> count

    @property
    def images_per_s(self) -> float:
        return (self.answered + self.failed) / self.seconds if self.seconds > 0 else 0.0

    def add(self, record: dict) -> None:
        if record["error"] is None:
            self.answered += 1
        else:
            self.failed += 1
            self.errors[record["error"]] = self.errors.get(record["error"], 0) + 1

    def describe(self) -> str:
        done = f"answered {self.answered}, failed {self.failed}"
        if self.skipped:
            done += f", skipped {self.skipped} already answered"
        first = f"; the first after {self.first_s:.1f} s" if self.first_s is not None else ""
        return (f"{done}; {self.images_per_s:.1f} images/s ({self.answered + self.failed} in {self.seconds:.1f} s"
                f"{first})")


def item_json(item: Item) -> str:
    return json.dumps(asdict(item), ensure_ascii=False)


def item_from_json(text: str) -> Item:
    return Item(**json.loads(text))
