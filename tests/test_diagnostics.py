"""Figures of the ip_diffim debug displays (Agg, no display) and their writers."""

import dataclasses
import logging
import re
import struct
import sys
import zlib

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


def _label_std(text):
    """The std of D/σ under the spatial model printed in a candidate's label."""
    return float(re.search(r"\nstd (\S+);", text).group(1))


def test_candidates_mosaic(result, pair):
    figure = diagnostics.display_candidates(result, pair.template, pair.science)
    _assert_not_blank(figure)
    mosaic, colour_bar = figure.axes
    fitted = _fitted(result)
    assert len(fitted) <= 24                            # few enough: every one is drawn
    assert len(mosaic.images) == 4 * len(fitted)
    labels = {t.get_gid(): t for t in mosaic.texts if t.get_gid()}
    assert set(labels) == {f"candidate-{r.id}" for r in fitted}
    for record in fitted:
        label = labels[f"candidate-{record.id}"]
        colour = diagnostics.GOOD_COLOUR if record.status == "GOOD" else diagnostics.BAD_COLOUR
        assert to_rgba(label.get_color()) == to_rgba(colour)
        assert f"#{record.id} at ({record.x}, {record.y})  {record.status}" in label.get_text()
    stds = [_label_std(t.get_text()) for t in mosaic.texts if t.get_gid()]
    assert stds == sorted(stds, reverse=True)           # one group, worst first
    assert "D/σ" in colour_bar.get_xlabel()
    good_only = diagnostics.display_candidates(result, pair.template, pair.science, show_bad=False)
    assert len(good_only.axes[0].images) == 4 * result.kernel_cell_set.n_good
    with pytest.raises(ConfigurationError, match="n_each"):
        diagnostics.display_candidates(result, pair.template, pair.science, n_each=0)


def test_candidates_worst_and_best(result, pair):
    fitted = _fitted(result)
    sample = diagnostics.display_candidates(result, pair.template, pair.science, n_each=2)
    shown = [t for t in sample.axes[0].texts if t.get_gid()]
    assert len(sample.axes[0].images) == 4 * 4 and len(shown) == 4
    stds = [_label_std(t.get_text()) for t in shown]
    assert stds[:2] == sorted(stds[:2], reverse=True) and stds[2:] == sorted(stds[2:])
    assert min(stds[:2]) >= max(stds[2:])
    # the two planted variable stars leave the largest residuals under the spatial model
    variables = pair.stars[pair.stars["kind"] == "variable"]
    worst = {int(t.get_gid().split("-")[1]) for t in shown[:2]}
    for star in variables:
        record = min(fitted, key=lambda r: np.hypot(r.x - star["x"], r.y - star["y"]))
        assert record.id in worst
    (hidden,) = [t for t in sample.findobj(matplotlib.text.Text) if t.get_gid() == "not-shown"]
    assert f"{len(fitted) - 4} fitted candidates not shown" in hidden.get_text()


class _ManyCandidates:
    """A cell set whose candidate list is replaced (other attributes from the real one)."""

    def __init__(self, cells, records):
        self._cells, self.candidates = cells, records
        self.n_good = sum(r.status == "GOOD" for r in records)
        self.n_bad = sum(r.status == "BAD" for r in records)

    def __getattr__(self, name):
        return getattr(self._cells, name)


def test_candidates_mosaic_of_a_crowded_field_stays_readable(result, pair):
    """500 fitted candidates: the mosaic shows the 12 worst and 12 best, at a bounded size."""
    fitted = _fitted(result)
    many = [dataclasses.replace(fitted[k % len(fitted)], id=k) for k in range(500)]
    crowded = dataclasses.replace(result, kernel_cell_set=_ManyCandidates(result.kernel_cell_set, many))
    figure = diagnostics.display_candidates(crowded, pair.template, pair.science)
    width, height = figure.get_size_inches() * figure.dpi
    assert width <= 2200 and height <= 1700, (width, height)
    assert len([t for t in figure.axes[0].texts if t.get_gid()]) == 24
    texts = [t.get_text() for t in figure.findobj(matplotlib.text.Text)]
    assert any("476 fitted candidates not shown" in t for t in texts)
    assert any(t.startswith("The 12 worst") for t in texts)
    assert any(t.startswith("The 12 best") for t in texts)


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
    mosaic, colour_bar = figure.axes
    assert len(mosaic.images) == 6
    titles = {t.get_gid(): t.get_text() for t in mosaic.texts if t.get_gid()}
    assert sorted(titles) == [f"basis-{i}" for i in range(6)]
    assert titles["basis-0"].startswith("B0: σ=")
    assert "u, v = −" in figure.get_suptitle()
    assert colour_bar.get_ylabel() == "B / max|B|"


def test_kernel_mosaic(result):
    from matplotlib.patches import Ellipse

    figure = diagnostics.display_kernel_mosaic(result, across=3)
    _assert_not_blank(figure)
    mosaic, colour_bar = figure.axes
    assert len(mosaic.images) == 3 * 3
    assert sum(isinstance(p, Ellipse) for p in mosaic.patches) == 3 * 3    # second-moment ellipses
    assert [line.get_marker() for line in mosaic.lines] == ["+"] * 9       # centroids
    titles = [t.get_text() for t in mosaic.texts if (t.get_gid() or "").startswith("kernel-")]
    assert len(titles) == 9 and all("ΣK=" in t for t in titles)
    assert "kernel value" in colour_bar.get_ylabel()


def test_spatial_model(result):
    figure = diagnostics.plot_kernel_spatial_model(result, max_coefficients=2)
    _assert_not_blank(figure)
    (mosaic,) = figure.axes
    rows = 2 + 1                                        # two coefficients and the background
    assert len(mosaic.images) == 2 * rows               # each map and its colour strip
    titles = {t.get_gid(): t.get_text() for t in mosaic.texts if t.get_gid()}
    assert sorted(titles) == [f"row-{k}" for k in range(rows)]
    assert titles["row-1"].startswith("coefficient 1")
    assert titles["row-2"].startswith("differential background") and titles["row-2"].endswith("(counts)")
    assert {"x (px)", "y (px)"} <= {t.get_text() for t in mosaic.texts}
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    cells = result.kernel_cell_set
    fitted = _fitted(result)
    assert legend == [f"GOOD ({sum(r.status == 'GOOD' for r in fitted)})",
                      f"BAD ({sum(r.status == 'BAD' for r in fitted)})"]
    assert cells.n_bad > 0


def test_kernel_coefficient_histograms(result):
    figure = diagnostics.plot_kernel_coefficients(result, max_coefficients=4)
    _assert_not_blank(figure)
    (mosaic,) = figure.axes
    titles = [t.get_text() for t in mosaic.texts if (t.get_gid() or "").startswith("coefficient-")]
    assert len(titles) == 4 and titles[0].startswith("0: σ=")
    assert sum("highest bin" in t.get_text() for t in mosaic.texts) == 4
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert any(label.startswith("BAD") for label in labels)
    assert "spatial model at the centre" in labels


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


def _inside_figure(figure, artist, renderer):
    box, frame = artist.get_window_extent(renderer), figure.bbox
    return (box.x0 >= frame.x0 - 0.5 and box.x1 <= frame.x1 + 0.5 and box.y0 >= frame.y0 - 0.5
            and box.y1 <= frame.y1 + 0.5)


_IMAGE_FIGURES = {
    "displayDiffIm": lambda r, p: diagnostics.display_diff_im(r, p.template, p.science),
    "displayTemplate": lambda r, p: diagnostics.display_template(r, p.template),
    "displaySpatialCells": lambda r, p: diagnostics.display_spatial_cells(r, p.science),
}


def _scaled(masked_image, factor):
    from gpudiffim import MaskedImage

    return MaskedImage(masked_image.image * factor, masked_image.mask, masked_image.variance * factor ** 2,
                       xy0=masked_image.xy0, mask_planes=masked_image.mask_planes)


@pytest.mark.parametrize("factor", [1e-3, 1e4])        # wide colour-bar tick labels: 0.035, 40000
@pytest.mark.parametrize("name", sorted(_IMAGE_FIGURES))
def test_colour_bar_labels_inside_the_figure(result, pair, name, factor):
    scaled = dataclasses.replace(result, matched_image=_scaled(result.matched_image, factor),
                                 subtracted_image=_scaled(result.subtracted_image, factor))
    images = dataclasses.replace(pair, template=_scaled(pair.template, factor),
                                 science=_scaled(pair.science, factor))
    figure = _IMAGE_FIGURES[name](scaled, images)
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    bars = [a for a in figure.axes if a.get_label() == "<colorbar>"]
    assert bars
    for bar in bars:
        label = bar.yaxis.label
        assert label.get_text() == "counts"
        assert _inside_figure(figure, label, renderer), (label.get_window_extent(renderer), figure.bbox)
        low, high = sorted(bar.get_ylim())
        drawn = [t for t in bar.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
        assert drawn and all(_inside_figure(figure, t, renderer) for t in drawn)
        offset = bar.yaxis.get_offset_text()
        assert not offset.get_text() or _inside_figure(figure, offset, renderer)
    for axes in figure.axes:
        assert _inside_figure(figure, axes.title, renderer) or not axes.get_title()


@pytest.fixture(scope="module")
def jwst_like(pair):
    """The pair as exposures whose headers say BUNIT = MJy/sr (as JWST images do)."""
    from gpudiffim import Exposure, ExposureInfo

    info = ExposureInfo(header={"BUNIT": "MJy/sr", "TELESCOP": "JWST"})
    return Exposure(pair.template, info=info), Exposure(pair.science, info=info)


def test_unit_from_the_bunit_header(result, pair, jwst_like):
    template, science = jwst_like
    for figure in (diagnostics.display_sci_im(result, science),
                   diagnostics.display_template(result, template),
                   diagnostics.display_spatial_cells(result, science),
                   diagnostics.display_diff_im(result, template, science)):
        bars = [a for a in figure.axes if a.get_label() == "<colorbar>"]
        assert bars and {bar.get_ylabel() for bar in bars} == {"MJy/sr"}
    candidates = diagnostics.display_candidates(result, template, science)
    assert any("stamps in MJy/sr" in t.get_text() for t in candidates.findobj(matplotlib.text.Text))
    # masked images carry no header: the fallback; an explicit unit wins over the header
    assert diagnostics.display_sci_im(result, pair.science).axes[1].get_ylabel() == diagnostics.DEFAULT_UNIT
    assert diagnostics.display_sci_im(result, science, unit="e-/s").axes[1].get_ylabel() == "e-/s"
    assert diagnostics.display_sci_im(result, science, unit=" ").axes[1].get_ylabel() == "MJy/sr"
    with pytest.raises(ConfigurationError, match="unit"):
        diagnostics.display_sci_im(result, science, unit=3)


def test_unit_reaches_the_spatial_model_through_write_figures(result, jwst_like, tmp_path, monkeypatch):
    template, science = jwst_like
    seen = {}
    original = diagnostics.plot_kernel_spatial_model

    def spy(*args, **kwargs):
        figure = original(*args, **kwargs)
        seen["texts"] = [t.get_text() for t in figure.findobj(matplotlib.text.Text)]
        return figure

    monkeypatch.setattr(diagnostics, "plot_kernel_spatial_model", spy)
    diagnostics.write_figures(result, template, science, tmp_path, names=("plotKernelSpatialModel",),
                              report=False)
    assert any(t.endswith("background (MJy/sr)") for t in seen["texts"])


def test_one_progress_record_per_figure(result, pair, tmp_path, caplog):
    names = ("displayKernelBasis", "displaySciIm", "displayDiffIm")
    with caplog.at_level(logging.INFO, logger="gpudiffim.diagnostics"):
        diagnostics.write_figures(result, pair.template, pair.science, tmp_path, names=names)
    messages = [r.getMessage() for r in caplog.records if r.name == "gpudiffim.diagnostics"]
    progress = [m for m in messages if m.startswith("figure ")]
    assert len(progress) == len(names)
    for k, (message, name) in enumerate(zip(progress, names), 1):
        assert re.fullmatch(rf"figure {k}/3 {name}: \d+\.\d\d s", message), message
    assert [m for m in messages if m.startswith("report ")] and len(messages) == len(names) + 1


def _pdf_objects(data):
    """Check the cross-reference table of a PDF; its objects by number (bytes after 'N 0 obj')."""
    start = int(re.search(rb"startxref\n(\d+)\n%%EOF\n$", data).group(1))
    assert data[start:start + 5] == b"xref\n"
    count = int(re.match(rb"xref\n0 (\d+)\n", data[start:]).group(1))
    table = data[start:].split(b"\n", 2)[2]
    objects = {}
    for number in range(1, count):
        entry = table[20 * number:20 * number + 20]
        offset = int(entry[:10])
        assert entry.endswith(b" 00000 n \n") and data[offset:].startswith(b"%d 0 obj\n" % number)
        objects[number] = data[offset + len(b"%d 0 obj\n" % number):]
    return objects


def test_report_pages_are_the_png_files(result, pair, tmp_path):
    names = ("displayKernelMosaic", "displayDiffIm")
    diagnostics.write_figures(result, pair.template, pair.science, tmp_path, names=names)
    objects = _pdf_objects((tmp_path / diagnostics.REPORT_NAME).read_bytes())
    images = [body for body in objects.values() if body.startswith(b"<< /Type /XObject /Subtype /Image")]
    assert len(images) == 1 + len(names)                     # the summary page, then the figures
    for body, name in zip(images[1:], names):
        width, height = (int(re.search(rb"/%s (\d+)" % key, body).group(1)) for key in (b"Width", b"Height"))
        length = int(re.search(rb"/Length (\d+) >>\nstream\n", body).group(1))
        stream = body[body.index(b"stream\n") + 7:][:length]
        rows = zlib.decompress(stream)
        assert len(rows) == height * (1 + 3 * width)          # PNG rows: a filter byte, then RGB
        png = (tmp_path / f"{name}.png").read_bytes()
        assert struct.unpack(">II", png[16:24]) == (width, height)
        image = matplotlib.image.imread(tmp_path / f"{name}.png")
        assert image.shape == (height, width, 3)


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


def test_cli_plots_use_the_bunit_of_the_input_files(pair, tmp_path, monkeypatch):
    from gpudiffim import Exposure
    from gpudiffim.io import write_exposure

    paths = {}
    for name in ("science", "template"):
        paths[name] = tmp_path / f"{name}.fits"
        write_exposure(paths[name], Exposure(getattr(pair, name)), header={"BUNIT": "MJy/sr"})
    labels = []
    original = diagnostics.display_sci_im

    def spy(*args, **kwargs):
        figure = original(*args, **kwargs)
        labels.append(figure.axes[1].get_ylabel())
        return figure

    monkeypatch.setattr(diagnostics, "display_sci_im", spy)
    code = main(["subtract", str(paths["science"]), str(paths["template"]), "-o", str(tmp_path / "d.fits"),
                 "--variance-correction", "none", "--config", "spatial_kernel_order=1",
                 "--plots", str(tmp_path / "plots"), "--debug", "displaySciIm"])
    assert code == 0 and labels == ["MJy/sr"]


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
