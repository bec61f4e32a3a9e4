"""The documentation's examples: every self-contained Python block of docs/ runs as written, all of them in one
shared folder (a reader runs them in any order in one place), and no two pages write the same file."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))
NEEDS_CHECKPOINT = "load_checkpoint("  # a block that reads a trained checkpoint (and the page after it) is not run here
# what a page must print, beyond running: the tracker's λ1 at every tracked step, and the stale Objective refused
PRINTS = {
    "track-training.md": [
        "step 20: λ1",
        "step 40: λ1",
        "step 60: λ1",
        "the model changed in place since this Objective copied it",
    ],
    "trainer-callbacks.md": ["step 10: λ1", "step 20: λ1", "step 30: λ1", "against Adam's threshold"],
}


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def runnable_pages() -> list[Path]:
    return [p for p in PAGES if self_contained(code_blocks(p, "python"))]


def self_contained(blocks: list[str]) -> list[str]:
    """The blocks up to the first that needs a checkpoint made beforehand (the blocks after it build on it)."""
    needs = [i for i, block in enumerate(blocks) if NEEDS_CHECKPOINT in block]
    return blocks[: needs[0]] if needs else blocks


@pytest.fixture(scope="module")
def shared_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("docs")


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_the_python_blocks_of_each_page_run_in_one_shared_folder(page, shared_folder, monkeypatch, capsys):
    monkeypatch.chdir(shared_folder)
    namespace: dict = {}  # one page's blocks build on each other, as a reader runs them
    for i, block in enumerate(self_contained(code_blocks(page, "python"))):
        if "transformers" in block:
            pytest.importorskip("transformers")
        if "lightning" in block:
            pytest.importorskip("lightning")
        exec(compile(block, f"{page.name}, block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed
    for expected in PRINTS.get(page.name, []):
        assert expected in printed, printed


def written_files(text: str) -> set[str]:
    """The files and folders a page's code blocks write: `--out X`, `path="X"` and `out=Path("X")`."""
    code = "\n".join(re.findall(r"```\w*\n(.*?)```", text, re.S))
    return set(re.findall(r"--out\s+([^\s\\]+)", code)) | set(re.findall(r"(?:path=|out=Path\()\"([^\"]+)\"", code))


def test_no_two_pages_write_the_same_file():
    """The README's commands and every page's can run in any order in one folder without overwriting each other."""
    writers: dict[str, list[str]] = {}
    for page in [ROOT / "README.md", *PAGES]:
        for name in written_files(page.read_text()):
            writers.setdefault(name, []).append(str(page.relative_to(ROOT)))
    shared = {name: pages for name, pages in writers.items() if len(pages) > 1}
    assert not shared, shared


LINKED_PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *PAGES]


def test_the_readme_is_one_screen_of_commands_and_links():
    """The details live in docs/; the README keeps CI's test command as a line of its own (.ci/run runs it)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    assert "python -m pytest --all -n 2" in lines


def heading_anchors(page: Path) -> set[str]:
    """Every heading's anchor, as GitHub writes it and as mkdocs (Python-Markdown's toc) writes it."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M):
        text = heading.lower().replace("`", "")
        anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))  # GitHub
        ascii_text = text.encode("ascii", "ignore").decode()
        anchors.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_text).strip()))  # mkdocs
    return anchors


def relative_links(page: Path) -> list[str]:
    """The targets of the page's Markdown links and images that are not URLs, outside code."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    """Links to files in the repository and to headings of its Markdown pages, as GitHub follows them."""
    assert not broken_links(page), broken_links(page)


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [code](`x.md`) `[not a link](gone.md)` [gone](gone.md) [bad](there.md#nope)\n")
    assert broken_links(page) == ["gone.md: no such file", "there.md#nope: no such heading"]
