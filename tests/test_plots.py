"""Loss-surface figures and `landscape plot`: shared scales, overlays, labels, real PNG/PDF files, one-line errors."""

import shutil

import h5py
import numpy as np
import pytest
import torch
from matplotlib.colors import LogNorm, to_hex

from analysis.cli import main
from analysis.report.charts import (
    label_colors,
    method_color,
    method_of,
    plot_lines,
    plot_surfaces,
    round_levels,
    save,
    shared_scale,
)
from landscape.engine.objective import Objective
from landscape.inputs.data import MeasurementSet, load_data
from landscape.inputs.models import model_for_data
from landscape.surfaces.directions import Directions, between, random_directions
from landscape.surfaces.surface import compute_surface, grid_axis, read_surface
from tests.helpers import result_of, run_cli

PNG = b"\x89PNG\r\n\x1a\n"


def objectives(seed: int) -> dict[str, Objective]:
    torch.manual_seed(seed)
    data = load_data("digits")
    model, _ = model_for_data("mlp", data, hidden=(16,))
    return {s: Objective(model, MeasurementSet(s, 128, 128, 0).batches(data)) for s in ("train", "test")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """1-D, 2-D, between and PCA surface files of two small MLPs (different seeds, so different losses)."""
    out = tmp_path_factory.mktemp("surfaces")
    a, b = objectives(0), objectives(1)
    line, plane = [grid_axis(-1, 1, 9)], [grid_axis(-1, 1, 7)] * 2
    for name, objs in (("a", a), ("b", b)):
        compute_surface(objs, random_directions(objs["train"], 1, seed=0), line, path=out / f"{name}-1d.h5")
        compute_surface(objs, random_directions(objs["train"], 2, seed=0), plane, path=out / f"{name}-2d.h5")
    compute_surface(a, between(a["train"], b["train"].model, "b.pt"), [grid_axis(-0.5, 1.5, 9)], path=out / "between.h5")
    pca = Directions(
        random_directions(a["train"], 2, seed=3).vectors,
        "pca",
        {"explained_variance_ratio": [0.7, 0.2]},
        trajectory=np.array([[-0.9, 0.4], [-0.5, 0.6], [-0.2, 0.1], [0.0, 0.0]]),
        labels=("epoch_0", "epoch_1", "epoch_2", "final"),
    )
    compute_surface(a, pca, plane, path=out / "pca.h5")
    return out


def panels(fig):
    """The surface panels of a figure (every axes but the colour bar)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_method_names_and_colours():
    assert [
        method_of(s)
        for s in (
            "SmoothOut a=0.01",
            "AdaSmoothOut",
            "S-SGD",
            "nso-b32",
            "small-batch SGD (B=32)",
            "SAM rho=0.05",
            "asam",
            "baseline",
        )
    ] == ["smoothout", "adasmoothout", "ssgd", "nso", "sgd", "sam", "asam", None]
    methods = ["sgd", "smoothout", "adasmoothout", "ssgd", "nso", "nrs", "sam"]
    assert len({method_color(m) for m in methods}) == len(methods)
    colors = label_colors(["SGD B=32", "SGD B=2000", "smoothout", "run-x", "run-y"])
    assert colors["SGD B=32"] == method_color("sgd") and colors["smoothout"] == method_color("smoothout")
    assert len(set(colors.values())) == 5  # a second SGD run and unnamed runs still get their own colours
    assert label_colors(["x", "sgd", "smoothout"])["smoothout"] == method_color("smoothout")  # not position-dependent


def test_round_levels_are_round_and_inside():
    assert round_levels(0.021, 2.49, 15, log=False).tolist() == pytest.approx([0.2 * k for k in range(1, 13)])
    log = round_levels(0.021, 2.49, 15, log=True)
    assert log[0] > 0.021 and log[-1] < 2.49 and 1.0 in log and len(log) <= 15
    narrow = round_levels(2.28, 2.49, 15, log=True)  # no 1…9 × 10^k inside: round linear steps, not an empty set
    assert len(narrow) >= 5 and narrow[0] > 2.28 and narrow[-1] < 2.49
    norm, levels = shared_scale([np.array([[1.0, np.nan], [3.0, 2.0]]), np.array([[0.5, 4.0]])], False, 10)
    assert (norm.vmin, norm.vmax) == (0.5, 4.0) and levels[0] == 0.5 and levels[-1] == 4.0


def test_line_overlay_colours_styles_log_and_caption(files, tmp_path):
    surfaces = {"sgd": read_surface(files / "a-1d.h5"), "smoothout a=0.01": read_surface(files / "b-1d.h5")}
    fig = plot_lines(surfaces, log=True, accuracy=True)
    ax, twin = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "filter-normalized random direction"
    lines = {(to_hex(line.get_color()), line.get_linestyle()): line.get_ydata() for line in ax.lines}
    for label, surface in surfaces.items():
        for split, style in (("train", "-"), ("test", "--")):
            np.testing.assert_array_equal(lines[(method_color(label), style)], surface.loss[split])
    assert len(twin.lines) == 4 and twin.get_ylim() == (0, 1.02)
    np.testing.assert_array_equal(twin.lines[0].get_ydata(), surfaces["sgd"].accuracy["train"])
    caption = fig._supxlabel.get_text()
    # an MLP: no BatchNorm mode to name
    assert "train 128, test 128 samples" in caption and "batch 128" in caption and "no BatchNorm" in caption
    path = save(fig, tmp_path / "line.png")
    assert path.read_bytes().startswith(PNG)


def test_line_between_marks_the_end_points(files):
    fig = plot_lines({"a→b": read_surface(files / "between.h5")}, splits=["test"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == "α (0 = A, 1 = B)" and ax.get_yscale() == "linear"
    assert [line.get_linestyle() for line in ax.lines] == ["--", ":", ":"]  # the test split only, then α = 0 and 1
    assert [line.get_xdata()[0] for line in ax.lines[1:]] == [0.0, 1.0]
    (top,) = ax.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["A", "B = b.pt"]  # A has no checkpoint path here
    with pytest.raises(ValueError, match="different kinds"):
        plot_lines({"a": read_surface(files / "a-1d.h5"), "b": read_surface(files / "between.h5")})


@pytest.mark.parametrize("kind", ["contour", "filled", "heatmap", "surface3d"])
def test_side_by_side_share_one_colour_scale(files, tmp_path, kind):
    a, b = read_surface(files / "a-2d.h5"), read_surface(files / "b-2d.h5")
    assert a.loss["train"].max() != b.loss["train"].max()  # the shared scale is not trivially shared
    fig = plot_surfaces({"a": a, "b": b}, kind=kind)
    low = min(a.loss["train"].min(), b.loss["train"].min())
    high = max(a.loss["train"].max(), b.loss["train"].max())
    left, right = panels(fig)
    (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bar.get_ylim() == pytest.approx((low, high))
    if kind == "surface3d":
        assert left.get_zlim() == right.get_zlim() == pytest.approx((low, high))
    else:
        mappables = [ax.collections[0] for ax in (left, right)]
        assert mappables[0].get_clim() == mappables[1].get_clim() == pytest.approx((low, high))
        if kind != "heatmap":
            np.testing.assert_array_equal(mappables[0].levels, mappables[1].levels)
            assert mappables[0].levels[0] == pytest.approx(low) and mappables[0].levels[-1] == pytest.approx(high)
        (origin,) = [line for line in left.lines if line.get_label() == "origin"]
        assert tuple(origin.get_xydata()[0]) == (0.0, 0.0)
    assert left.get_xlabel() == "filter-normalized random direction 1"
    assert save(fig, tmp_path / f"{kind}.png").read_bytes().startswith(PNG)


def test_log_scale_and_pca_trajectory_overlay(files, tmp_path):
    surface = read_surface(files / "pca.h5")
    fig = plot_surfaces({"pca": surface}, kind="contour", log=True)
    (ax,) = panels(fig)
    contours = ax.collections[0]
    assert isinstance(contours.norm, LogNorm)
    assert np.all(np.diff(contours.levels) > 0) and contours.levels[0] == pytest.approx(surface.loss["train"].min())
    (path,) = [line for line in ax.lines if line.get_label() == "trajectory"]
    np.testing.assert_array_equal(path.get_xydata(), surface.directions.trajectory)
    assert ax.get_xlabel() == "PC1 (70.0% of variance)" and ax.get_ylabel() == "PC2 (20.0% of variance)"
    assert {"epoch_0", "final"} <= {t.get_text() for t in ax.texts}
    assert save(fig, tmp_path / "pca.pdf").read_bytes().startswith(b"%PDF")


def test_plot_refuses_missing_splits_and_wrong_dimensions(files):
    surface = read_surface(files / "a-2d.h5")
    with pytest.raises(ValueError, match="1-D surface"):
        plot_surfaces({"a": read_surface(files / "a-1d.h5")})
    with pytest.raises(ValueError, match="unknown kind"):
        plot_surfaces({"a": surface}, kind="pie")
    with pytest.raises(ValueError, match="no validation split"):
        plot_surfaces({"a": surface}, split="validation")


@pytest.mark.cli
def test_cli_writes_figures_and_warns_on_incomplete_files(files, tmp_path):
    partial = tmp_path / "partial.h5"
    shutil.copy(files / "a-2d.h5", partial)
    with h5py.File(partial, "r+") as f:
        f["done"][:2] = 0
        f["train/loss"][:2] = np.nan
    result = run_cli("plot", partial, files / "b-2d.h5", "--kind", "filled", "--log", "--labels", "sgd,sam")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'partial.png'}"
    assert (tmp_path / "partial.png").read_bytes().startswith(PNG)
    assert "14 of 49 points missing" in result.stderr


def plot_args(files, args: list[str]) -> list:
    return ["plot", *[str(files / a) if a.endswith(".h5") else a for a in args], "--out", str(files / "never.pdf")]


def assert_one_line_error(stderr: str, message: str) -> None:
    (line,) = stderr.strip().splitlines()
    assert line.startswith("landscape plot: error: ") and message in line


@pytest.mark.cli
def test_cli_process_refuses_a_mismatched_kind_with_one_line(files):
    result = run_cli(*plot_args(files, ["b-2d.h5", "--kind", "line"]))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--kind line cannot draw a 2-D surface; use --kind contour|")
    assert not (files / "never.pdf").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["a-1d.h5", "--kind", "contour"], "--kind contour cannot draw a 1-D surface; use --kind line"),
        (["a-1d.h5", "a-2d.h5"], "cannot plot 1-D and 2-D surfaces together"),
        (["a-1d.h5", "b-1d.h5", "--labels", "x"], "--labels has 1 labels for 2 files"),
        (["a-1d.h5", "--kind", "line", "--split", "test", "--accuracy", "--log"], None),
        (["a-2d.h5", "--accuracy"], "--accuracy applies to line plots"),
        (["missing.h5"], "no such file"),
        (["not-hdf5.h5"], "not-hdf5.h5 cannot be read as HDF5"),
    ],
)
def test_cli_in_process(files, capsys, args, message):
    (files / "not-hdf5.h5").write_text("hello\n")
    code = main(plot_args(files, args))
    if message is None:
        assert code == 0 and (files / "never.pdf").read_bytes().startswith(b"%PDF")
        (files / "never.pdf").unlink()
    else:
        assert code == 2
        assert_one_line_error(capsys.readouterr().err, message)
        assert not (files / "never.pdf").exists()


def test_many_planes_wrap_into_rows_readable_at_page_width(files, tmp_path):
    """Five planes: three a row (two rows), each panel as wide as in a single-row figure, the spare axis hidden."""
    a, b = read_surface(files / "a-2d.h5"), read_surface(files / "b-2d.h5")
    fig = plot_surfaces({f"m{i}": (a, b)[i % 2] for i in range(5)}, kind="contour")
    shown = [ax for ax in panels(fig) if ax.get_visible()]
    assert len(shown) == 5 and len(panels(fig)) == 6
    assert len({round(ax.get_position().y0, 3) for ax in shown}) == 2
    width, _ = fig.get_size_inches()
    assert width <= 4.4 * 3 + 1.4
    save(fig, tmp_path / "five.png")


@pytest.mark.cli
def test_a_surface_being_written_can_be_read(files, tmp_path):
    """Another process holds the file open for writing (HDF5's own lock): plotting it meanwhile still works."""
    import shutil
    import subprocess
    import sys

    path = shutil.copy(files / "a-2d.h5", tmp_path / "busy.h5")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        surface = read_surface(path)
        assert surface.loss["train"].shape == read_surface(files / "a-2d.h5").loss["train"].shape
    finally:
        holder.kill()
        holder.wait()


def test_four_planes_are_two_by_two(files):
    a = read_surface(files / "a-2d.h5")
    fig = plot_surfaces({f"m{i}": a for i in range(4)}, kind="contour")
    assert len(panels(fig)) == 4 and all(ax.get_visible() for ax in panels(fig))


def test_several_seeds_draw_their_mean_and_a_95_percent_band(files):
    import scipy.stats

    seeds = [read_surface(files / "a-1d.h5"), read_surface(files / "b-1d.h5")]
    fig = plot_lines({"sgd": seeds}, log=True)
    ax = fig.axes[0]
    train = np.array([s.loss["train"] for s in seeds])
    solid = next(line for line in ax.lines if line.get_linestyle() == "-")
    np.testing.assert_allclose(solid.get_ydata(), train.mean(axis=0))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # the train band: the first one drawn
    half = scipy.stats.t.ppf(0.975, 1) * train.std(axis=0, ddof=1) / np.sqrt(2)
    assert band.max() == pytest.approx((train.mean(axis=0) + half).max(), rel=1e-9)
    assert any("95% CI" in text.get_text() for text in ax.get_legend().get_texts())


def _curve(increase, prediction):
    from landscape.sharpness.perturb import SharpnessCurve

    return result_of(
        SharpnessCurve,
        radii=[0.005, 0.01, 0.02],
        increase=increase,
        increase_ci=[[v * 0.9, v * 1.1] for v in increase],
        prediction=prediction,
        distribution="uniform",
        scale="absolute",
    )


def test_sharpness_panels_put_each_method_beside_the_reference_with_95_percent_bands():
    import scipy.stats

    from analysis.report.charts import plot_sharpness_panels

    base = [_curve([1e-3, 4e-3, 1.6e-2], [1e-3, 4e-3, 1.6e-2]), _curve([2e-3, 6e-3, 2e-2], [1e-3, 5e-3, 2.2e-2])]
    curves = {"sgd B=2000": base, **{f"{m} B=2000": [_curve([5e-4, 2e-3, 8e-3], None)] * 2 for m in ("smoothout", "nso", "sam")}}
    fig = plot_sharpness_panels(curves, "sgd B=2000")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 3
    for ax, name in zip(shown, ("smoothout", "nso", "sam")):
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts[0].startswith("sgd B=2000") and texts[1].startswith(name)
    ax = shown[0]
    mean_line = ax.lines[0]
    increase = np.array([c.increase for c in base])
    np.testing.assert_allclose(mean_line.get_ydata(), increase.mean(axis=0))
    # the dotted prediction is the mean over seeds, not the first seed's
    np.testing.assert_allclose(ax.lines[1].get_ydata(), np.mean([c.prediction for c in base], axis=0))
    assert ax.lines[1].get_linestyle() == ":"
    half = scipy.stats.t.ppf(0.975, 1) * increase.std(axis=0, ddof=1) / np.sqrt(2)
    top = ax.collections[0].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx((increase.mean(axis=0) + half).max(), rel=1e-9)
    assert "95% CI" in fig._supxlabel.get_text() and "second-order prediction" in fig._supxlabel.get_text()
