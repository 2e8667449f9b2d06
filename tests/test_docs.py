"""The documentation's links lead somewhere: every relative link in README.md,
DEPLOYMENT.md and docs/*.md names a file of the repository, and every #anchor a heading of
its page (GitHub's anchors), so moving a section cannot leave a reader at a dead link."""
from __future__ import annotations

import glob
import os
import re

from twisted.trial import unittest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "DEPLOYMENT.md"] + sorted(
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: str):
    """(line number, line) of a Markdown file outside its fenced code blocks."""
    fenced = False
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif not fenced:
                yield number, line


def anchors(path: str) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, a
    repeated one numbered."""
    seen: dict = {}
    found = set()
    for _, line in prose(path):
        heading = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


class LinkTests(unittest.TestCase):
    def test_pages_exist(self) -> None:
        self.assertIn("docs/architecture.md", PAGES)

    def test_every_relative_link_and_anchor_resolves(self) -> None:
        broken = []
        for page in PAGES:
            for number, line in prose(page):
                for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
                    if re.match(r"[a-z]+:", target):
                        continue  # http:, https:, mailto:
                    path, _, anchor = target.partition("#")
                    linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) \
                        if path else page
                    if not os.path.exists(os.path.join(REPO, linked)):
                        broken.append(f"{page}:{number}: {target}: no file {linked}")
                    elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
                        broken.append(f"{page}:{number}: {target}: no heading #{anchor}")
        self.assertEqual(broken, [])
