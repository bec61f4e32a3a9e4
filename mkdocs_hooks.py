"""mkdocs hook: the repository's figures/ in the built site.

A page links a figure as GitHub resolves it, relative to the page's own file (`../figures/x.png` from
docs/results.md, `../../figures/x.png` from docs/how-to/). mkdocs builds only docs/, so this hook adds every
figures/*.png to the build as figures/x.png and points such links at it: the same Markdown shows the figure
on GitHub and on the site, and `mkdocs build --strict` checks that it exists.
"""

import re
from pathlib import Path

from mkdocs.structure.files import File

FIGURES = Path(__file__).resolve().parent / "figures"
LINK = re.compile(r"\]\(((?:\.\./)+)figures/([^)\s]+\.png)\)")


def on_files(files, config):
    for png in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # folders between docs/ and the page

    def to_site(match: re.Match) -> str:
        if len(match.group(1)) != 3 * (depth + 1):  # not the repository's figures/ folder
            return match.group(0)
        return "](" + "../" * depth + "figures/" + match.group(2) + ")"

    return LINK.sub(to_site, markdown)
