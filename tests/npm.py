"""The npm packages of demo/web (transformers.js, onnxruntime-web and -node), installed from its lockfile the first
time a Node or browser test needs them, so that the README's test command passes on a fresh clone.

Installed by the tests rather than by the README's command so that the command is the same with and without Node:
where Node or npm is missing, the tests that need them skip and say how to get them; everything else runs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

WEB = Path(__file__).resolve().parents[1] / "demo" / "web"
NODE_MODULES = WEB / "node_modules"
# The lockfile's hash, written after a successful `npm ci`: a changed lockfile installs again.
STAMP = NODE_MODULES / ".installed-from-lockfile"
# --onnxruntime-node-install=skip: onnxruntime-node's install script would download GPU binaries (a host the tests
# cannot reach); its CPU binaries ship in the package.
NPM_CI = ["npm", "ci", "--onnxruntime-node-install=skip", "--no-audit", "--no-fund"]
MIN_NODE_MAJOR = 18  # transformers.js 4 and onnxruntime-node need Node 18 or newer
GET_NODE = "install Node.js 20 with npm (for example `apt-get install nodejs npm`) to run the transformers.js tests"


def node_major() -> int | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout
    try:
        return int(version.strip().lstrip("v").split(".")[0])
    except ValueError:
        return None


def npm_packages() -> Path:
    """demo/web/node_modules, installed from package-lock.json if it is missing or older than the lockfile. Skips
    the calling test where Node or npm is absent; fails, with npm's own message, where `npm ci` fails."""
    major = node_major()
    if major is None:
        pytest.skip(f"Node.js or npm is not on PATH: {GET_NODE}")
    if major < MIN_NODE_MAJOR:
        pytest.skip(f"Node.js {major} is too old (transformers.js needs {MIN_NODE_MAJOR} or newer): {GET_NODE}")
    lockfile = hashlib.sha256((WEB / "package-lock.json").read_bytes()).hexdigest()
    # One install at a time (pytest-xdist workers, two checkouts' test runs); the lock lives outside node_modules,
    # which `npm ci` deletes first.
    lock = Path(tempfile.gettempdir()) / f"paligemma-npm-{hashlib.sha256(bytes(WEB)).hexdigest()[:16]}.lock"
    with FileLock(lock, timeout=600):
        if STAMP.is_file() and STAMP.read_text() == lockfile:
            return NODE_MODULES
        done = subprocess.run(NPM_CI, cwd=WEB, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(NPM_CI)}` in demo/web failed (exit {done.returncode}):\n"
                        f"{(done.stderr or done.stdout)[-2000:]}")
        STAMP.write_text(lockfile)
    return NODE_MODULES
