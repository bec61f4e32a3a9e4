"""One report, two renderings: Markdown (figures linked) and self-contained HTML (figures embedded)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Report:
    """An ordered list of blocks: headings, paragraphs, tables and figures (paths relative to the report)."""

    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("heading", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> None:
        self.blocks.append(("table", list(headers), [[str(c) for c in row] for row in rows], caption))

    def figure(self, path: str, caption: str) -> None:
        self.blocks.append(("figure", path, caption))

    def interactive(self, path: str, fragment: str, caption: str) -> None:
        """An interactive view: `fragment` (HTML with its scripts) embedded in the HTML page, a link to the
        self-contained page `path` (relative to the report) in Markdown."""
        self.blocks.append(("interactive", path, caption, fragment))

    def prepend(self, section: Report) -> None:
        """Place `section`'s blocks before this report's (its title is not used): e.g. findings above the tables."""
        self.blocks[:0] = section.blocks

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += [f"## {block[1]}", ""]
            elif kind == "paragraph":
                out += [block[1], ""]
            elif kind == "table":
                _, headers, rows, caption = block
                out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
                out += ["", f"*{caption}*", ""] if caption else [""]
            elif kind == "interactive":
                _, path, caption, _ = block
                out += [f"[Interactive view: {caption.rstrip('.')}]({path})", ""]
            else:
                _, path, caption = block
                out += [f"![{caption}]({path})", "", f"*{caption}*", ""]
        return "\n".join(out)

    def html(self, folder: Path) -> str:
        """HTML with every figure inlined as a data URI, so the one file can be mailed or archived."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                body.append(f"<h2>{inline_html(block[1])}</h2>")
            elif kind == "paragraph":
                body.append(f"<p>{inline_html(block[1])}</p>")
            elif kind == "table":
                _, headers, rows, caption = block
                head = "".join(f"<th>{inline_html(h)}</th>" for h in headers)
                cells = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>" for row in rows)
                cap = f"<caption>{inline_html(caption)}</caption>" if caption else ""
                body.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            elif kind == "interactive":
                _, _, caption, fragment = block
                body.append(f"<figure>{fragment}<figcaption>{inline_html(caption)}</figcaption></figure>")
            else:
                _, path, caption = block
                data = base64.b64encode((folder / path).read_bytes()).decode()
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption.replace("`", ""))}">'
                    f"<figcaption>{inline_html(caption)}</figcaption></figure>"
                )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n"
        )

    def write(self, folder: Path, name: str = "report") -> tuple[Path, Path]:
        """NAME.md and NAME.html in `folder` (figure paths are relative to it); under torchrun only rank 0 writes."""
        md, page = folder / f"{name}.md", folder / f"{name}.html"
        write_text(md, self.markdown())
        write_text(page, self.html(folder))
        return md, page


def inline_html(text: str) -> str:
    """Escaped text with its Markdown code spans (`--k 5`) as <code>: the report's text is written for Markdown."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unmatched backtick is a character, not a span
        return html.escape(text)
    return "".join(f"<code>{html.escape(part)}</code>" if i % 2 else html.escape(part) for i, part in enumerate(parts))


def write_text(path: Path, text: str) -> Path:
    """Write a report's text file; under torchrun only rank 0 writes (the others computed the same text)."""
    from landscape.engine import distributed

    if distributed.is_main():
        path.write_text(text)
    return path


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "th{background:#f4f4f4}caption{caption-side:bottom;font-style:italic;padding-top:4px;text-align:left}"
    "figure{margin:1.5em 0}img{max-width:100%}figcaption{font-style:italic;font-size:0.9em}"
    "code{font-family:ui-monospace,monospace;font-size:0.95em;background:#f4f4f4;padding:0 2px}"
)
