"""Process start-up: a command's (or a worker's) imports made once, without the garbage collector scanning them again.

Not part of any room: the command layer, the report and its worker processes use it.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Whether `imports_settled` has run in this process.
SETTLED = {"done": False}


@contextmanager
def imports_settled() -> Iterator[None]:
    """Run a command's imports with the garbage collector paused, then freeze the objects they made.

    A command's imports (pandas, scipy, anndata, ...) make about a million objects that live as long as the
    process; each collection while they are made scans them and frees nothing, and each full collection
    after them would scan them all again (together about 0.15 s of a one-second ``check``). Paused, then
    moved to the permanent generation (`gc.freeze`), they are never scanned; the command's own objects are
    collected as usual. Only the first call in a process does this (later ones import nothing new), so a
    process running many commands (the tests) freezes once.
    """
    if SETTLED["done"]:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        SETTLED["done"] = True
        gc.freeze()
        if enabled:
            gc.enable()
