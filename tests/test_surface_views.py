"""Views of surfaces: the VTK file parses back to the grid and its values, the HTML page holds plotly and the
z-values on one shared colour scale, reports embed it, `landscape plot` draws spreads, and a real browser renders it."""

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from analysis.cli import main
from analysis.report.document import Report
from analysis.report.surface_views import add_interactive_view, write_vts
from landscape.engine.objective import Objective
from landscape.surfaces.directions import random_directions
from landscape.surfaces.spread import compute_spread, read_spread
from landscape.surfaces.surface import compute_surface, grid_axis, read_surface
from tests.helpers import classification_batches, tiny_mlp


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two 2-D surfaces of different models (a 5 × 3 grid: x and y cannot be swapped unnoticed), and a 1-D spread."""
    out = tmp_path_factory.mktemp("views")
    _, _, batches = classification_batches(40, (12,), 4, [20, 20])
    axes = [grid_axis(-1, 1, 5), grid_axis(-0.5, 0.5, 3)]
    for name, seed in (("a", 0), ("b", 1)):
        objective = Objective(tiny_mlp(seed), batches)
        compute_surface(
            {"train": objective, "test": Objective(objective.model, batches[:1])},
            random_directions(objective, 2, seed=0),
            axes,
            path=out / f"{name}.h5",
            quantities=["grad-norm"],
        )
    compute_spread(Objective(tiny_mlp(0), batches), [grid_axis(-1, 1, 5)], n=3, path=out / "spread.h5")
    return out


def _array(root, name: str) -> np.ndarray:
    (node,) = [a for a in root.iter("DataArray") if a.get("Name") == name]
    return np.array([float(v) for v in node.text.split()])


def test_vtk_file_parses_back_to_the_grid_and_values(files, tmp_path):
    surface = read_surface(files / "a.h5")
    path = write_vts(surface, tmp_path / "a.vts")
    root = ET.parse(path).getroot()
    assert root.get("type") == "StructuredGrid"
    assert root.find("StructuredGrid").get("WholeExtent") == "0 4 0 2 0 0"
    (points,) = [a for a in root.iter("DataArray") if a.get("NumberOfComponents") == "3"]
    xyz = np.array([float(v) for v in points.text.split()]).reshape(-1, 3)
    assert xyz.shape == (15, 3)
    # VTK order: x fastest. Point (i, j) is row i + 5 j
    for i, j in ((0, 0), (4, 0), (1, 2), (3, 1)):
        assert tuple(xyz[i + 5 * j]) == (surface.axes[0][i], surface.axes[1][j], surface.loss["train"][i, j])
    np.testing.assert_array_equal(_array(root, "test_loss"), surface.loss["test"].ravel("F"))
    np.testing.assert_array_equal(_array(root, "train_grad-norm"), surface.quantities["grad-norm"]["train"].ravel("F"))
    np.testing.assert_array_equal(_array(root, "cost_backwards"), np.full(15, 2.0))
    assert (_array(root, "computed") == 1).all()
    with pytest.raises(ValueError, match="2-D surface"):
        write_vts(read_spread(files / "spread.h5").member(0), tmp_path / "x.vts")


def test_html_holds_plotly_and_the_z_values_on_one_colour_scale(files, tmp_path):
    pytest.importorskip("plotly")
    from analysis.report.surface_views import surface_figure

    a, b = read_surface(files / "a.h5"), read_surface(files / "b.h5")
    assert a.loss["train"].max() != b.loss["train"].max()
    fig = surface_figure({"a": a, "b": b})
    low = min(a.loss["train"].min(), b.loss["train"].min())
    high = max(a.loss["train"].max(), b.loss["train"].max())
    left, right = fig.data
    assert (left.cmin, left.cmax) == (right.cmin, right.cmax) == pytest.approx((low, high))
    assert tuple(fig.layout.scene.zaxis.range) == tuple(fig.layout.scene2.zaxis.range) == pytest.approx((low, high))
    np.testing.assert_array_equal(np.array(left.z), a.loss["train"].T)  # plotly's z[j][i] is at (x[i], y[j])

    assert main(["plot", str(files / "a.h5"), str(files / "b.h5"), "--html", "--out", str(tmp_path / "ab.html")]) == 0
    page = (tmp_path / "ab.html").read_text()
    assert "Plotly.newPlot" in page and re.search(r"plotly\.js v\d", page)  # the library itself, inlined: works offline
    assert "cdn.plot.ly" not in page.split("Plotly.newPlot")[1]
    payload = json.loads(re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', page, re.S).group(1))
    np.testing.assert_array_equal(np.array(payload[1]["z"]), b.loss["train"].T)


def test_report_embeds_the_view_or_says_how_to_get_it(files, tmp_path, monkeypatch):
    pytest.importorskip("plotly")
    import analysis.report.surface_views as views

    surfaces = {"a": read_surface(files / "a.h5")}
    report = Report("r")
    add_interactive_view(report, surfaces, tmp_path, "view.html", "Turn it.")
    page = report.html(tmp_path)
    assert "Plotly.newPlot" in page and "<figcaption>Turn it.</figcaption>" in page
    assert "[Interactive view: Turn it](view.html)" in report.markdown() and (tmp_path / "view.html").exists()
    monkeypatch.setattr(views, "plotly_available", lambda: False)
    bare = Report("r")
    add_interactive_view(bare, surfaces, tmp_path, "none.html", "Turn it.")
    assert "pip install 'landscape[interactive]'" in bare.markdown() and not (tmp_path / "none.html").exists()


def test_plot_command_draws_spreads_and_writes_vtk(files, tmp_path, capsys):
    assert main(["plot", str(files / "spread.h5"), "--out", str(tmp_path / "spread.png")]) == 0
    assert (tmp_path / "spread.png").read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert main(["plot", str(files / "a.h5"), "--vtk", "--out", str(tmp_path / "a.vts"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == [str(tmp_path / "a.vts")]
    assert main(["plot", str(files / "spread.h5"), "--vtk"]) == 2
    assert "--vtk shows 2-D surfaces" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.cli
@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (apt-get install chromium)")
def test_a_real_browser_renders_the_surface(files, tmp_path):
    """Headless Chromium draws the page with WebGL (software): the screenshot shows the coloured surface, not a blank."""
    pytest.importorskip("plotly")
    from matplotlib.image import imread

    assert main(["plot", str(files / "a.h5"), "--html", "--out", str(tmp_path / "a.html")]) == 0
    shot = tmp_path / "a.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            f"--screenshot={shot}",
            "--window-size=1000,700",
            "--virtual-time-budget=10000",
            (tmp_path / "a.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    rgb = imread(shot)[..., :3]
    scene = rgb[:, : int(0.8 * rgb.shape[1])]  # left of the colour bar (and of the tool bar's coloured logo)
    coloured = (scene.max(axis=-1) - scene.min(axis=-1)) > 0.25  # viridis, not the grey and white of axes and page
    assert coloured.sum() > 5000, f"the surface is not drawn: {coloured.sum()} coloured pixels"
