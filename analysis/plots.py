"""Matplotlib figures from result data (landscape/ itself never imports matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig: plt.Figure, path: str | Path) -> Path:
    """Write PNG or PDF (by suffix), creating the folder; close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_spectral_densities(spectra: Mapping[str, dict], top_eigenvalues: Mapping[str, list] | None = None,
                            *, title: str = "Hessian spectral density (SLQ)") -> plt.Figure:
    """Overlay SLQ densities on a log scale, marking each run's top eigenvalues from Lanczos."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for i, (label, spectrum) in enumerate(spectra.items()):
        color = f"C{i}"
        density = np.maximum(np.asarray(spectrum["density"]), 1e-8)
        ax.plot(spectrum["grid"], density, color=color, label=label, lw=1.6)
        for value in (top_eigenvalues or {}).get(label, []):
            ax.axvline(value, color=color, ls=":", lw=1.0)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(frameon=False)
    ax.grid(alpha=0.3)
    return fig
