"""Head bundles the server can predict with: those in the operator's bundle folder, and uploaded ones.

Every sub-folder of the bundle folder holding ``head.json`` and ``head.safetensors`` (as
``scdrugmap train --out`` writes them) is registered at start and offered to every user. A
bundle uploaded with a job belongs to that job alone and is never listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scdrugmap.readwrite import META_FILE as BUNDLE_META
from scdrugmap.readwrite import WEIGHTS_FILE as BUNDLE_WEIGHTS
from scdrugmap.web.db import HeadBundle
from scdrugmap.web.storage import Storage

log = logging.getLogger(__name__)


def bundle_sha256(folder: Path) -> str:
    """Return the sha256 over a bundle's JSON and weights."""
    digest = hashlib.sha256((folder / BUNDLE_META).read_bytes())
    with open(folder / BUNDLE_WEIGHTS, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def describe(meta: dict[str, Any]) -> dict[str, Any]:
    """Return the facts of a bundle worth showing (model, kind, strategy, cells trained on)."""
    keys = ("model", "kind", "strategy", "layer", "n_cells", "n_sensitive", "embedding_dim", "created", "scdrugmap")
    return {k: meta[k] for k in keys if k in meta}


def register_bundle_dir(session: Session, folder: Path | None) -> int:
    """Register every bundle in ``folder`` (new or changed), and mark vanished ones unavailable; return the count."""
    if folder is None or not Path(folder).is_dir():
        return 0
    seen = set()
    count = 0
    for path in sorted(Path(folder).iterdir()):
        if not (path / BUNDLE_META).is_file() or not (path / BUNDLE_WEIGHTS).is_file():
            continue
        try:
            meta = json.loads((path / BUNDLE_META).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            log.warning("skipping head bundle: unreadable head.json", extra={"bundle": str(path), "error": str(err)})
            continue
        if not isinstance(meta, dict) or "model" not in meta or "kind" not in meta:
            log.warning("skipping head bundle: head.json lacks model or kind", extra={"bundle": str(path)})
            continue
        location = str(path.resolve())
        seen.add(location)
        bundle = session.scalar(select(HeadBundle).where(HeadBundle.public.is_(True), HeadBundle.location == location))
        if bundle is None:
            bundle = HeadBundle(location=location, public=True)
            session.add(bundle)
        bundle.name = path.name
        bundle.model = str(meta["model"])
        bundle.kind = str(meta["kind"])
        bundle.strategy = str(meta.get("strategy", "frozen"))
        bundle.meta = json.loads(json.dumps(describe(meta), default=str))
        bundle.sha256 = bundle_sha256(path)
        bundle.available = True
        count += 1
    for bundle in session.scalars(select(HeadBundle).where(HeadBundle.public.is_(True))):
        if bundle.location not in seen and str(Path(bundle.location).parent) == str(Path(folder).resolve()):
            bundle.available = False
    session.commit()
    log.info("registered head bundles", extra={"folder": str(folder), "bundles": count})
    return count


def public_bundles(session: Session) -> list[HeadBundle]:
    return list(session.scalars(select(HeadBundle).where(HeadBundle.public.is_(True), HeadBundle.available.is_(True))
                                .order_by(HeadBundle.model, HeadBundle.name)))


def bundle_folder(bundle: HeadBundle, storage: Storage) -> Path:
    """Return the folder of a bundle: the registered folder, or the random folder of an uploaded one."""
    return Path(bundle.location) if bundle.public else storage.bundle_dir(bundle.location)
