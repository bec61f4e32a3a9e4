"""Rendering and statistics: tables, quantities, paired differences, charts, the Markdown/HTML report."""
