"""PDF text is drawn from a small copy of the report font: the same glyphs and names, made once per machine."""

from __future__ import annotations

import io
import re
import zlib
from pathlib import Path

import matplotlib as mpl
import pytest
from fontTools.ttLib import TTFont
from matplotlib import font_manager
from matplotlib.figure import Figure

from scdrugmap.report import fonts
from scdrugmap.report.render import RenderedFigure
from scdrugmap.report.style import RC_PARAMS


def _whole_font(weight: str = "normal") -> Path:
    with mpl.rc_context(RC_PARAMS):
        return Path(font_manager.findfont(font_manager.FontProperties(family="sans-serif", weight=weight)))


def _embedded_families(data: bytes) -> list[str]:
    """Return the family name inside each font program a PDF embeds (its FontFile2 streams)."""
    objects = dict(re.findall(rb"\n(\d+) 0 obj\s*(.*?)endobj", data, re.S))
    families = []
    for number in re.findall(rb"/FontFile2 (\d+) 0 R", data):
        stream = re.search(rb"stream\r?\n(.*)endstream", objects[number], re.S).group(1)
        families.append(TTFont(io.BytesIO(zlib.decompress(stream)))["name"].getDebugName(1))
    return families


def _figure(text: str) -> Figure:
    figure = Figure(figsize=(3, 1))
    ax = figure.add_subplot()
    ax.set_title("Bold title", fontweight="bold")
    ax.text(0.1, 0.5, text)
    return figure


def test_the_copy_keeps_the_kept_characters_glyphs_metrics_and_postscript_name():
    rc = fonts.pdf_font_rc(RC_PARAMS, ["AUROC"])
    source = _whole_font()
    if source.name != "DejaVuSans.ttf":
        pytest.skip(f"the report font here is {source.name}, not matplotlib's DejaVu Sans")
    family = rc["font.sans-serif"][0]
    assert family == "DejaVu Sans" + fonts.FAMILY_SUFFIX
    copy_path = fonts._copy_path(source)
    found = Path(font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False))
    # the same copy: one made earlier in this process under another SCDRUGMAP_HOME has the same name and bytes
    assert copy_path.parent == fonts.font_copy_dir() and found.name == copy_path.name
    assert found.read_bytes() == copy_path.read_bytes()
    whole, copy = TTFont(source), TTFont(copy_path)
    assert len(copy.getGlyphOrder()) < len(whole.getGlyphOrder()) / 4
    assert copy["name"].getDebugName(6) == whole["name"].getDebugName(6) == "DejaVuSans"  # what a PDF names
    whole_cmap, copy_cmap = whole.getBestCmap(), copy.getBestCmap()
    for char in "AUROC fi ±²³ αχΔ … ⁻⁴ − ≤ é":
        glyph, copied = whole_cmap[ord(char)], copy_cmap[ord(char)]
        assert copy["hmtx"][copied] == whole["hmtx"][glyph]
        assert copy["glyf"][copied].getCoordinates(copy["glyf"])[0] == whole["glyf"][glyph].getCoordinates(whole["glyf"])[0]
    assert ord("Ж") in whole_cmap and ord("Ж") not in copy_cmap  # outside the kept blocks: from the whole font
    assert {"GSUB", "GPOS"} <= set(copy.keys())  # ligatures and kerning shape text as the whole font does


def test_a_pdf_draws_its_text_from_the_copy_unless_a_character_is_outside_it():
    if _whole_font().name != "DejaVuSans.ttf":
        pytest.skip("the report font here is not matplotlib's DejaVu Sans")
    copy = "DejaVu Sans" + fonts.FAMILY_SUFFIX
    data = RenderedFigure(_figure("AUROC ± SD, fine")).save("pdf")
    assert set(re.findall(rb"/BaseFont /[A-Z]{6}\+(\S+)", data)) == {b"DejaVuSans", b"DejaVuSans-Bold"}  # as before
    assert set(_embedded_families(data)) == {copy}  # text, the "fi" ligature and the bold title: all from the copy
    cyrillic = RenderedFigure(_figure("Ж")).save("pdf")
    assert set(_embedded_families(cyrillic)) == {"DejaVu Sans"}  # a character outside the copy: the whole font, as before
    assert fonts.pdf_font_rc(RC_PARAMS, ["AUROC", "Ж"]) == {}


def test_the_copy_is_made_once_and_reused(monkeypatch):
    fonts.pdf_font_rc(RC_PARAMS, ["AUROC"])
    made = sorted(fonts.font_copy_dir().glob("*.ttf"))
    assert made, "no copy was made"
    stamps = [path.stat().st_mtime_ns for path in made]
    monkeypatch.setattr(fonts, "_make_copy", lambda *_: pytest.fail("the copy was made again"))
    fonts.pdf_font_rc(RC_PARAMS, ["AUROC"])
    assert [path.stat().st_mtime_ns for path in made] == stamps


def test_a_chosen_family_or_a_font_that_cannot_be_copied_keeps_the_settings(monkeypatch):
    assert fonts.pdf_font_rc({**RC_PARAMS, "font.family": ["serif"]}, ["AUROC"]) == {}

    def fails(*_):
        raise OSError("read-only cache")

    monkeypatch.setattr(fonts, "_make_copy", fails)
    monkeypatch.setenv("SCDRUGMAP_HOME", str(fonts.font_copy_dir().parent / "other"))
    assert fonts.pdf_font_rc(RC_PARAMS, ["AUROC"]) == {}
    figure = _figure("still drawn")
    assert RenderedFigure(figure).save("pdf").startswith(b"%PDF")  # from the whole font, as before


def test_pdf_svg_and_png_are_unchanged_by_the_copy(monkeypatch):
    """The PNG and SVG never use the copy; the PDF's pages hold the same drawing operators with or without it."""
    saved = {fmt: RenderedFigure(_figure("AUROC ± SD, fine")).save(fmt) for fmt in ("png", "svg", "pdf")}
    monkeypatch.setattr("scdrugmap.report.render.pdf_font_rc", lambda rc, text: {})
    whole = {fmt: RenderedFigure(_figure("AUROC ± SD, fine")).save(fmt) for fmt in ("png", "svg", "pdf")}
    assert saved["png"] == whole["png"]
    assert "scDrugMap" not in saved["svg"].decode() and b"DejaVu Sans" in saved["svg"]

    def page(data: bytes) -> bytes:  # the first content stream: paths, text positions and character codes
        return zlib.decompress(re.search(rb"stream\r?\n(x.*?)endstream", data, re.S).group(1))

    assert page(saved["pdf"]) == page(whole["pdf"])
    assert set(_embedded_families(saved["pdf"])) != set(_embedded_families(whole["pdf"]))  # yet from the copy
