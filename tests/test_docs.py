"""The docs stay true to the code: the CLI reference is regenerated and compared, links resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def generate_cli_reference(output: Path) -> str:
    subprocess.run([sys.executable, "-m", "typer", "dermcam.cli", "utils", "docs", "--name", "dermcam",
                    "--output", str(output)], check=True, capture_output=True, env=None)
    return output.read_text(encoding="utf-8")


def test_cli_reference_is_up_to_date(tmp_path: Path) -> None:
    fresh = generate_cli_reference(tmp_path / "cli.md")
    committed = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert fresh == committed, ("docs/cli.md is out of date; regenerate it with: "
                                "python -m typer dermcam.cli utils docs --name dermcam --output docs/cli.md")


def test_every_page_in_the_nav_exists() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = re.findall(r":\s*([\w-]+\.md)\s*$", nav, flags=re.M)
    assert pages, "mkdocs.yml lists no pages"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"pages in mkdocs.yml but not in docs/: {missing}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"])
def test_relative_links_resolve(page: str) -> None:
    path = (DOCS / page).resolve()
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (path.parent / target).exists(), f"{page} links to missing {target}"


def heading_anchors(path: Path) -> set[str]:
    """The ids mkdocs gives a page's headings (Python-Markdown's toc slugify: punctuation dropped,
    lower case, runs of spaces and hyphens become one hyphen)."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", h).strip().lower()) for h in headings}


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) + ["../README.md"])
def test_links_to_a_section_name_one_that_exists(page: str) -> None:
    path = (DOCS / page).resolve()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", path.read_text(encoding="utf-8")):
        linked = (path.parent / target).resolve() if target else path
        if linked.suffix == ".md" and linked.is_file():
            assert anchor in heading_anchors(linked), f"{page} links to #{anchor}, which {linked.name} lacks"
