"""The documentation's relative links resolve: every linked file exists and every #anchor names a heading of the
linked Markdown file (GitHub's slugs). Moving a module or renaming a section must move its links too."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(path: Path):
    """(line number, line) outside fenced code blocks, with inline code removed."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield number, re.sub(r"`[^`]*`", "", line)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            name = slug(heading.group(1))
            seen[name] = seen.get(name, -1) + 1
            yield name if seen[name] == 0 else f"{name}-{seen[name]}"


def markdown_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return sorted(name for name in set(listed) if (ROOT / name).exists())


def test_slugs_follow_github():
    assert slug("LiT: 93.6% retrieval") == "lit-936-retrieval"
    assert slug("int8's time to first token") == "int8s-time-to-first-token"
    assert slug("The layout (`--format transformers.js`)") == "the-layout---format-transformersjs"


@pytest.mark.parametrize("name", markdown_files())
def test_every_relative_link_resolves(name):
    path = ROOT / name
    broken = []
    for number, line in prose_lines(path):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{name}:{number}: {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in set(anchors(linked)):
                broken.append(f"{name}:{number}: {target}: no heading with that anchor")
    assert not broken, "\n".join(broken)
