"""Figures of the ip_diffim debug displays (Agg, no display) and their writers."""

import sys

import matplotlib
import matplotlib.image
import matplotlib.text
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from gpudiffim import ConfigurationError, ImagePsfMatchTask, MissingDependencyError, PsfMatchConfig
from gpudiffim import diagnostics
from gpudiffim.cli import EXIT_BAD_INPUT, main

CONFIG = PsfMatchConfig(fit_for_background=True, spatial_kernel_order=1)


@pytest.fixture(scope="module")
def pair(variable_star_pair):
    return variable_star_pair


@pytest.fixture(scope="module")
def result(variable_star_fit):
    return variable_star_fit


def _pixels(figure):
    """RGB pixels of the figure rendered by Agg (at a low resolution, for speed)."""
    figure.set_dpi(40)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(float)


def _assert_not_blank(figure):
    rgb = _pixels(figure)
    not_white = np.any(rgb < 250, axis=-1).mean()
    assert not_white > 0.05, f"only {not_white:.1%} of the figure is drawn"
    assert rgb.std() > 20


def _fitted(result):
    return [r for r in result.kernel_cell_set.candidates if r.coefficients]


def test_candidates_mosaic(result, pair):
    figure = diagnostics.display_candidates(result, pair.template, pair.science)
    _assert_not_blank(figure)
    mosaic, colour_bar = figure.axes
    fitted = _fitted(result)
    assert len(mosaic.images) == 4 * len(fitted)
    labels = {t.get_gid(): t for t in mosaic.texts if t.get_gid()}
    assert set(labels) == {f"candidate-{r.id}" for r in fitted}
    for record in fitted:
        label = labels[f"candidate-{record.id}"]
        colour = diagnostics.GOOD_COLOUR if record.status == "GOOD" else diagnostics.BAD_COLOUR
        assert to_rgba(label.get_color()) == to_rgba(colour)
        assert f"#{record.id} at ({record.x}, {record.y})  {record.status}" in label.get_text()
    assert "D/σ" in colour_bar.get_xlabel()
    good_only = diagnostics.display_candidates(result, pair.template, pair.science, show_bad=False)
    assert len(good_only.axes[0].images) == 4 * result.kernel_cell_set.n_good
    sample = diagnostics.display_candidates(result, pair.template, pair.science, max_candidates=6)
    shown = [t for t in sample.axes[0].texts if t.get_gid()]
    assert len(sample.axes[0].images) == 4 * 6 and len(shown) == 6
    assert sum("BAD" in t.get_text().split("\n")[0] for t in shown) == 3
    assert any("3 GOOD and 3 BAD of them shown" in t.get_text()
               for t in sample.findobj(matplotlib.text.Text))


def test_planted_variable_star_is_red_with_its_reason(result, pair):
    figure = diagnostics.display_candidates(result, pair.template, pair.science)
    labels = {t.get_gid(): t for t in figure.axes[0].texts if t.get_gid()}
    variables = pair.stars[pair.stars["kind"] == "variable"]
    found = 0
    for star in variables:
        record = min(result.kernel_cell_set.candidates,
                     key=lambda r: np.hypot(r.x - star["x"], r.y - star["y"]))
        assert np.hypot(record.x - star["x"], record.y - star["y"]) < 1.5
        assert record.status == "BAD" and record.reason
        label = labels[f"candidate-{record.id}"]
        assert to_rgba(label.get_color()) == to_rgba(diagnostics.BAD_COLOUR)
        assert record.reason in " ".join(label.get_text().split("\n")[2:])
        assert "BAD" in label.get_text() and "χ²" in label.get_text()
        found += 1
    assert found == 2


def test_kernel_basis_mosaic(result):
    figure = diagnostics.display_kernel_basis(result, max_panels=6)
    _assert_not_blank(figure)
    assert len(figure.axes) == 6 + 1
    assert figure.axes[0].get_title().startswith("B0: σ=")
    assert "u (px)" in {a.get_xlabel() for a in figure.axes}
    assert figure.axes[-1].get_ylabel() == "B / max|B|"


def test_kernel_mosaic(result):
    figure = diagnostics.display_kernel_mosaic(result, across=3)
    _assert_not_blank(figure)
    assert len(figure.axes) == 3 * 3 + 1
    panel = figure.axes[0]
    assert len(panel.patches) == 1                      # second-moment ellipse
    assert panel.lines[0].get_marker() == "+"           # centroid
    assert "ΣK=" in panel.get_title() and "kernel value" in figure.axes[-1].get_ylabel()


def test_spatial_model(result):
    figure = diagnostics.plot_kernel_spatial_model(result, max_coefficients=2)
    _assert_not_blank(figure)
    rows = 2 + 1                                        # two coefficients and the background
    assert len(figure.axes) == 3 * rows + rows          # map, vs x, vs y, and a colour bar per map
    titles = [a.get_title(loc="left") for a in figure.axes]
    assert any(t.startswith("coefficient 1") for t in titles)
    assert any(t.startswith("differential background") for t in titles)
    assert {"x (px)", "y (px)"} <= {a.get_xlabel() for a in figure.axes}


def test_kernel_coefficient_histograms(result):
    figure = diagnostics.plot_kernel_coefficients(result, max_coefficients=4)
    _assert_not_blank(figure)
    assert len(figure.axes) == 4
    assert figure.axes[0].get_xlabel() == "coefficient value"
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("BAD") for label in labels)


def test_template_and_science(result, pair):
    for function, image, stretch in ((diagnostics.display_template, pair.template, "zscale"),
                                     (diagnostics.display_sci_im, pair.science, "asinh")):
        figure = function(result, image, stretch=stretch)
        _assert_not_blank(figure)
        image_axes, colour_bar = figure.axes
        assert image_axes.get_xlabel() == "x (px)" and colour_bar.get_ylabel() == "counts"


def test_spatial_cells(result, pair):
    figure = diagnostics.display_spatial_cells(result, pair.science)
    _assert_not_blank(figure)
    axes = figure.axes[0]
    assert len(figure.axes) == 2
    cells = result.kernel_cell_set
    n_cells = (-(-(cells.bbox[2] + 1) // cells.size_cell_x)) * (-(-(cells.bbox[3] + 1) // cells.size_cell_y))
    assert len(axes.patches) == n_cells
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend[:2] == [f"GOOD ({cells.n_good})", f"BAD ({cells.n_bad})"]


def test_difference_panels(result, pair):
    figure = diagnostics.display_diff_im(result, pair.template, pair.science)
    _assert_not_blank(figure)
    images = [a for a in figure.axes if a.get_label() != "<colorbar>"]
    assert len(images) == 4 and len(figure.axes) == 4 + 4   # four images and their colour bars
    assert images[3].get_title().startswith("Difference")
    assert all(a.get_xlabel() == "x (px)" for a in images)
    match = ImagePsfMatchTask(CONFIG).match_masked_images(pair.template, pair.science)
    assert len(diagnostics.display_diff_im(match, pair.template, pair.science).axes) == 3 + 3


def test_check_debug_names():
    assert diagnostics.check_debug_names(("display",)) == diagnostics.FIGURE_NAMES
    assert diagnostics.check_debug_names("displayKernelBasis") == ("displayKernelBasis",)
    assert diagnostics.check_debug_names(["displayDiffIm", "showBadCandidates", "displayCandidates"]) \
        == ("displayCandidates", "displayDiffIm")
    assert diagnostics.check_debug_names(None) == ()
    for bad in (["displayKernal"], [3], 5):
        with pytest.raises(ConfigurationError):
            diagnostics.check_debug_names(bad)


def _pdf_pages(path):
    return path.read_bytes().count(b"/Type /Page\n") + path.read_bytes().count(b"/Type /Page ")


def test_write_figures(result, pair, tmp_path):
    folder = tmp_path / "plots"
    names = ("displayTemplate", "displaySpatialCells")
    written = diagnostics.write_figures(result, pair.template, pair.science, folder, names=names)
    assert written == [str(folder / f"{n}.png") for n in names] + [str(folder / diagnostics.REPORT_NAME)]
    for name in names:
        image = matplotlib.image.imread(folder / f"{name}.png")
        assert image.ndim == 3 and image[..., :3].std() > 0.05
    report = folder / diagnostics.REPORT_NAME
    assert report.read_bytes().startswith(b"%PDF")
    assert _pdf_pages(report) == 1 + len(names)      # summary page, then the figures
    with pytest.raises(ConfigurationError):
        diagnostics.write_figures(result, pair.template, pair.science, folder, stretch="log")


def test_summary_page(result):
    figure = diagnostics.summary_figure(result)
    assert figure.texts[0].get_text() == "gpudiffim PSF-matching report"
    text = figure.texts[1].get_text()
    assert "spatial condition number" in text and "quality over" in text
    assert np.any(_pixels(figure) < 128)


def test_task_debug_writes_the_selected_figures(pair, tmp_path):
    task = ImagePsfMatchTask(CONFIG, debug=("displaySpatialCells",), debug_dir=tmp_path / "debug")
    task.subtract_masked_images(pair.template, pair.science)
    assert sorted(p.name for p in (tmp_path / "debug").iterdir()) == \
        ["displaySpatialCells.png", diagnostics.REPORT_NAME]
    assert ImagePsfMatchTask(CONFIG, debug=()).debug == ()
    with pytest.raises(ConfigurationError, match="debug_dir"):
        ImagePsfMatchTask(CONFIG, debug=("display",))
    with pytest.raises(ConfigurationError, match="unknown debug name"):
        ImagePsfMatchTask(CONFIG, debug=("displayKernal",), debug_dir=tmp_path)


def test_missing_matplotlib_is_a_clear_import_error(monkeypatch, tmp_path, result, pair):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install gpudiffim\[plot\]") as info:
        diagnostics.display_kernel_basis(result)
    assert isinstance(info.value, ImportError)
    with pytest.raises(ImportError, match=r"gpudiffim\[plot\]"):
        ImagePsfMatchTask(CONFIG, debug=("display",), debug_dir=tmp_path)
    with pytest.raises(ImportError):
        diagnostics.write_figures(result, pair.template, pair.science, tmp_path)


@pytest.fixture(scope="module")
def fits_pair(tmp_path_factory, pair):
    from gpudiffim import Exposure
    from gpudiffim.io import write_exposure

    folder = tmp_path_factory.mktemp("cli")
    paths = {}
    for name in ("science", "template"):
        paths[name] = folder / f"{name}.fits"
        write_exposure(paths[name], Exposure(getattr(pair, name)))
    return paths


def test_cli_plots_writes_pngs_pdf_and_quality(fits_pair, tmp_path):
    from astropy.io import fits

    output, plots = tmp_path / "diff.fits", tmp_path / "plots"
    code = main(["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o", str(output),
                 "--variance-correction", "none", "--config", "spatial_kernel_order=1",
                 "--plots", str(plots), "--debug", "displayTemplate,displaySciIm",
                 "--debug", "displaySpatialCells"])
    assert code == 0
    assert sorted(p.name for p in plots.iterdir()) == sorted(
        ["displayTemplate.png", "displaySciIm.png", "displaySpatialCells.png", diagnostics.REPORT_NAME])
    assert _pdf_pages(plots / diagnostics.REPORT_NAME) == 4
    with fits.open(output) as hdus:
        assert isinstance(hdus["QUALITY"], fits.BinTableHDU) and len(hdus["QUALITY"].data) > 5


def test_cli_plot_options_are_checked_before_the_fit(fits_pair, tmp_path, capsys, monkeypatch):
    base = ["subtract", str(fits_pair["science"]), str(fits_pair["template"]), "-o", str(tmp_path / "d.fits")]
    assert main([*base, "--debug", "displayCandidates"]) == EXIT_BAD_INPUT
    assert "--plots" in capsys.readouterr().err
    assert main([*base, "--plots", str(tmp_path / "p"), "--debug", "nonsense"]) == EXIT_BAD_INPUT
    assert "unknown debug name" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*base, "--plots", str(tmp_path / "p")]) == EXIT_BAD_INPUT
    assert "pip install gpudiffim[plot]" in capsys.readouterr().err
    assert not (tmp_path / "d.fits").exists()
