"""Reports: blocks placed in order, rendered to Markdown and to one self-contained HTML file, written by rank 0."""

from pathlib import Path

from analysis.report.document import Report, write_text


def _report() -> Report:
    report = Report("Title")
    report.heading("Measured")
    report.table(["a", "b"], [[1, "x|y"]], "caption")
    return report


def test_prepend_places_a_section_before_the_existing_blocks():
    report, front = _report(), Report("unused title")
    front.paragraph("set-up")
    front.heading("Question")
    report.prepend(front)
    assert [b[0] for b in report.blocks] == ["paragraph", "heading", "heading", "table"]
    text = report.markdown()
    assert text.startswith("# Title\n") and text.index("set-up") < text.index("## Question") < text.index("## Measured")
    assert "unused title" not in text


def test_markdown_escapes_table_pipes_and_html_escapes_text(tmp_path):
    report = _report()
    report.paragraph("<b>bold?</b>")
    assert "| 1 | x\\|y |" in report.markdown()
    page = report.html(tmp_path)
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "<b>bold?</b>" not in page


def test_write_writes_both_files_outside_torchrun(tmp_path):
    md, page = _report().write(tmp_path)
    assert md.read_text().startswith("# Title") and page.read_text().startswith("<!doctype html>")
    assert write_text(tmp_path / "x.txt", "text").read_text() == "text"


def test_html_renders_code_spans_instead_of_literal_backticks():
    report = Report("R")
    report.paragraph("rerun with `--k 5` <or> `--tol 1e-4`")
    report.table(["metric"], [["`eig`"]], "a `--probes` caption, a lone ` kept")
    page = report.html(Path("."))
    assert "<p>rerun with <code>--k 5</code> &lt;or&gt; <code>--tol 1e-4</code></p>" in page
    assert "<td><code>eig</code></td>" in page and "`eig`" not in page
    assert "<caption>a `--probes` caption, a lone ` kept</caption>" in page  # three backticks: none a span
    assert "`--k 5`" in report.markdown()  # Markdown keeps them: they are its syntax
