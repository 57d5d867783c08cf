"""Save one report figure in several formats, laying it out and measuring it once.

`savefig(bbox_inches="tight")` lays a constrained-layout figure out again, and draws it once
more to measure its tight bounding box, for every format. A report saves each figure as PNG,
SVG, PDF and the HTML page's PNG, so `RenderedFigure` does the layout and the measuring once
(at the PNG resolution, with one Agg renderer), then fixes the layout and the box; each format
is then one draw, and each format's bytes are made once and shared by its file and the HTML
page. The PNG is pixel for pixel the one of ``savefig(bbox_inches="tight")``; SVG and PDF
now share the PNG's layout (``savefig`` laid them out with their own renderers' text sizes,
which moved some axes by a few points).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from scdrugmap.report.fonts import pdf_font_rc
from scdrugmap.report.style import RC_PARAMS

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from matplotlib.transforms import Bbox

#: zlib level of the PNG files (and of the HTML page's PNGs): 1 writes them several times faster than
#: Pillow's default 6, for files about a fifth larger.
PNG_COMPRESS_LEVEL = 1
#: Metadata that leaves the save time out of SVG and PDF files (with `RC_PARAMS`' fixed ``svg.hashsalt``).
REPRODUCIBLE_METADATA: dict[str, dict[str, None]] = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}
#: What turns the rc-chosen layout engine off (`Figure.set_layout_engine(None)` reads these).
_NO_AUTOMATIC_LAYOUT: dict[Any, Any] = {"figure.autolayout": False, "figure.constrained_layout.use": False}


def _keep_title_and_label_positions(figure: Figure) -> None:
    """Keep the axes titles and axis labels where the final layout placed them, in axes coordinates.

    matplotlib places them again in every draw and tight box: a title above any tick labels at the top,
    an axis label beyond its tick labels, each time measuring every tick label of the axes (and a title
    every y tick label too). Once the layout is fixed those places no longer change, so each is set
    once, as axes coordinates (they scale with the axes at any dpi). The PNG is unchanged to the pixel;
    SVG and PDF, drawn at 72 dpi, keep the PNG's places (they moved by up to a quarter point).
    """
    for ax in figure.axes:
        if getattr(ax, "_autotitlepos", None):  # matplotlib's flag, set False by set_title(y=...)
            ax._autotitlepos = False  # type: ignore[attr-defined]
        to_axes = ax.transAxes.inverted()
        for axis in (ax.xaxis, ax.yaxis):
            label = axis.label
            x, y = to_axes.transform(label.get_transform().transform(label.get_position()))
            axis.set_label_coords(x, y)  # axes coordinates; matplotlib no longer moves it


class RenderedFigure:
    """A figure saved as bytes per format, laid out and measured once.

    Parameters
    ----------
    figure
        A finished figure; after the first `save` its layout is fixed (no layout engine), so it
        must not be changed afterwards.
    """

    def __init__(self, figure: Figure) -> None:
        self.figure = figure
        self._bbox: Bbox | None = None
        self._saved: dict[str, bytes] = {}

    def _fix_layout(self) -> Bbox:
        """Lay the figure out at the PNG resolution, fix that layout and return its padded tight box (inches)."""
        figure = self.figure
        FigureCanvasAgg(figure)  # one Agg renderer sizes the text for the layout and for the box
        dpi = mpl.rcParams["savefig.dpi"]
        original = figure.dpi
        figure.set_dpi(original if dpi == "figure" else dpi)
        try:
            # the layout alone, without the draw `savefig` adds before measuring (the same PNG, tested)
            if (engine := figure.get_layout_engine()) is not None:
                engine.execute(figure)
            box = figure.get_tightbbox()
            _keep_title_and_label_positions(figure)  # at this dpi: labels were placed in its pixels
        finally:
            figure.set_dpi(original)
        with mpl.rc_context(_NO_AUTOMATIC_LAYOUT):
            figure.set_layout_engine(None)  # keep the positions just computed
        pad = mpl.rcParams["savefig.pad_inches"]
        return box.padded(pad)

    def _texts(self) -> list[str]:
        return [text.get_text() for text in self.figure.findobj(Text)]

    def save(self, fmt: str) -> bytes:
        """Return the figure saved as ``fmt`` (``png``, ``svg``, ``pdf``), made on the first call only."""
        if fmt not in self._saved:
            with mpl.rc_context(RC_PARAMS):
                if self._bbox is None:
                    self._bbox = self._fix_layout()
                buffer = io.BytesIO()
                options: dict[str, Any] = {"pil_kwargs": {"compress_level": PNG_COMPRESS_LEVEL}} if fmt == "png" else {}
                if fmt in REPRODUCIBLE_METADATA:  # no time stamp: a report made twice gives the same files
                    options["metadata"] = REPRODUCIBLE_METADATA[fmt]
                fonts = pdf_font_rc(RC_PARAMS, self._texts()) if fmt == "pdf" else {}
                with mpl.rc_context(fonts):  # the same PDF text, from a small copy of the font (`pdf_font_rc`)
                    self.figure.savefig(buffer, format=fmt, bbox_inches=self._bbox, **options)
            self._saved[fmt] = buffer.getvalue()
        return self._saved[fmt]
