"""How the measures' table rows and quantity labels are spelled: the pieces several measures share."""

from __future__ import annotations

Row = tuple[str, str, str, str]  # quantity, value ± uncertainty, cost, note

EPSILON_SHARPNESS = "ε-sharpness"
SCALE_INVARIANT = "scale-invariant"  # the table's mark of a measure a function-preserving rescaling leaves unchanged
LOWER_BOUND = "a lower bound on the maximum (the largest loss an ascent found)"


def noise_increase_label(radius: float) -> str:
    """The sharpness curve's quantity at radius a: E[L(w+u)] − L(w), u ~ U[−a, a]: "ΔL a=0.02"."""
    return f"ΔL a={radius:g}"


def eigenvalue_label(i: int) -> str:
    """The i-th (1-based) Lanczos eigenvalue: "λ1"."""
    return f"λ{i}"


def pm(value: float, err: float) -> str:
    """value ± uncertainty, to the digits a table shows."""
    return f"{value:.6g} ± {err:.2g}"


def uncertified_eigenvalue(value: float, which: str) -> str:
    """A Ritz value with no evidence of its index: no ±, only what interlacing guarantees (θ_i ≤ λ_i for the largest,
    θ_i ≥ λ_i for the smallest)."""
    return {"LA": f"≥ {value:.6g}", "SA": f"≤ {value:.6g}"}.get(which, f"{value:.6g}")


def ball_label(name: str, p: str) -> str:
    """The row label: ("adaptive-worst-case", "inf") → adaptive worst-case ℓ∞."""
    adaptive = name.startswith("adaptive-")
    return f"{'adaptive ' if adaptive else ''}{name.removeprefix('adaptive-')} ℓ{'∞' if p == 'inf' else '2'}"
