"""Reports of a benchmark run: paper figures, extra diagnostics and a self-contained HTML file.

The report room only reads a run directory (the results store written by
`scdrugmap benchmark`); it never trains, embeds or imports the runner.

Examples
--------
>>> from scdrugmap.report import write_report
>>> paths = write_report("scdrugmap-runs/demo", formats=("html", "png"))  # doctest: +SKIP
"""

from scdrugmap.report.write import FORMATS, write_report

__all__ = ["FORMATS", "write_report"]
