"""A small copy of the report's font for its PDF files, so embedding the font costs a fraction as much.

matplotlib embeds a TrueType font in every PDF as a subset of the glyphs it uses, made with
fontTools from the whole font file: for DejaVu Sans (6,000 glyphs, 40 KB of kerning) that is
about 0.15 s per font and file, and a report writes some 25 of them, more than half of all its
PDF time. `pdf_font_rc` makes, once per machine, a copy of each report font cut down to the
characters labels use (Latin, Greek, punctuation, super- and subscripts, a few signs), and
returns the settings that put it first while PDF files are drawn. matplotlib then subsets the
small copy, several times faster, into the same glyphs: the outlines, advances, kerning and
ligatures are the font's own (its layout features are kept), and the PostScript name is kept,
so a PDF names ``DejaVuSans`` as before. A figure with a character outside the copy is drawn
from the whole font (matplotlib falls back to no other font of a generic family). PNG and SVG
(whose text names its font family) never use the copy.

Only a TrueType font file (``.ttf``) is copied; anything else, or any failure, leaves the
settings as they are (the PDF is then made from the whole font, as before).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from scdrugmap.config import home_dir
from scdrugmap.data.io import write_atomic

log = logging.getLogger(__name__)

#: Characters kept in the copy: ASCII and Latin-1, Latin Extended-A, Greek, general punctuation, super-
#: and subscripts, arrows, and the signs figures write (minus, ×, ≤, ≥, ≈).
KEPT_CHARACTERS: tuple[range, ...] = (
    range(0x20, 0x7F), range(0xA0, 0x180), range(0x370, 0x400), range(0x2000, 0x2070), range(0x2070, 0x20A0),
    range(0x2190, 0x2200), range(0x2212, 0x2213), range(0x2248, 0x2249), range(0x2260, 0x2266),
)
#: Bumped whenever the copy changes, so older copies are not reused (2: the font's own date, not the save time).
COPY_VERSION = 2
#: Added to a copy's family name: it must not be mistaken for the whole font.
FAMILY_SUFFIX = " (scDrugMap report subset)"
#: The name records that carry the family: family (1), full (4) and typographic family (16) names.
FAMILY_NAME_IDS = (1, 4, 16)


def font_copy_dir() -> Path:
    """Return the folder of the font copies (created on first use)."""
    return home_dir() / "fonts"


def _copy_path(source: Path) -> Path:
    import fontTools

    stat = source.stat()
    facts = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{fontTools.version}|{COPY_VERSION}"
    return font_copy_dir() / f"{source.stem}-{hashlib.sha256(facts.encode()).hexdigest()[:16]}.ttf"


def _make_copy(source: Path, target: Path) -> None:
    """Write the cut-down copy of ``source`` to ``target`` (atomically: concurrent reports may race)."""
    from fontTools import subset
    from fontTools.ttLib import TTFont

    options = subset.Options()
    options.layout_features = ["*"]  # ligatures and kerning, as the whole font shapes text
    options.name_IDs = ["*"]
    options.name_languages = ["*"]
    options.glyph_names = True
    options.notdef_outline = True
    options.recalc_bounds = False  # the font's own bounds, as in its descriptor of the whole font
    options.drop_tables += ["FFTM"]  # FontForge's time stamp: fontTools cannot subset it (and says so)
    font = TTFont(source, recalcTimestamp=False)  # the font's own date: the same copy wherever it is made
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=[code for block in KEPT_CHARACTERS for code in block])
    subsetter.subset(font)
    for record in font["name"].names:
        if record.nameID in FAMILY_NAME_IDS:
            record.string = record.toUnicode() + FAMILY_SUFFIX
    write_atomic(target, font.save)


def _copy_family(source: Path, characters: set[str]) -> str | None:
    """Return the family name of ``source``'s copy (made if missing, registered with matplotlib), None if it lacks a character."""
    from matplotlib import font_manager

    target = _copy_path(source)
    if not target.exists():
        _make_copy(source, target)
        log.debug("made the report font copy %s of %s", target, source)
    if not any(Path(entry.fname) == target for entry in font_manager.fontManager.ttflist):
        font_manager.fontManager.addfont(target)
    if not {ord(c) for c in characters} <= font_manager.get_font(target).get_charmap().keys():
        return None
    return font_manager.FontProperties(fname=target).get_name()


def pdf_font_rc(rc: dict[Any, Any], text: Iterable[str]) -> dict[Any, Any]:
    """Return the settings that draw PDF ``text`` from small copies of the fonts ``rc`` (over the current settings) chooses.

    Empty when ``text`` has a character outside the copies, the fonts are not TrueType files, or a
    copy cannot be made or read (said in the debug log).
    """
    import matplotlib as mpl
    from matplotlib import font_manager

    with mpl.rc_context(rc):
        family = list(mpl.rcParams["font.family"])
        if family != ["sans-serif"]:  # the report sets no family; a user's own choice stays untouched
            return {}
        chosen = list(mpl.rcParams["font.sans-serif"])
        characters = set().union(*map(set, text)) - {"\n"}
        try:
            sources = {Path(font_manager.findfont(font_manager.FontProperties(family="sans-serif", weight=weight),
                                                  fallback_to_default=False)) for weight in ("normal", "bold")}
            if any(source.suffix.lower() != ".ttf" for source in sources):
                return {}
            copies = [_copy_family(source, characters) for source in sorted(sources)]
        except (OSError, ValueError, KeyError, ImportError) as err:  # fontTools or the font cannot do it: as before
            log.debug("PDF text keeps the whole font (%s)", err)
            return {}
    if None in copies:
        return {}
    return {"font.sans-serif": [*dict.fromkeys(copies), *chosen]}
