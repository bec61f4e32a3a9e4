"""What users read: comparisons, plots, reports, paper figures and the `landscape` CLI."""
