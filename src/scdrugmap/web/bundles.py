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


#: Keys of the paper's MLP head (``nn.Sequential`` indices 0, 2, 4), as frozen and LoRA bundles store them.
MLP_KEYS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
LOGISTIC_KEYS = ("mean", "scale", "coef", "intercept")
#: Widest embedding a head may take.
MAX_EMBEDDING_DIM = 1_000_000


def _mlp_problem(state: dict[str, Any], width: int | None) -> str | None:
    """Return what is wrong with an MLP head's tensors (names, shapes chaining, input width), or None."""
    missing = [k for k in MLP_KEYS if k not in state]
    if missing:
        return f"the MLP head lacks {missing}"
    shapes = {k: tuple(state[k].shape) for k in MLP_KEYS}
    w0, w2, w4 = shapes["0.weight"], shapes["2.weight"], shapes["4.weight"]
    if len(w0) != 2 or len(w2) != 2 or len(w4) != 2 or w2[1] != w0[0] or w4 != (1, w2[0]) or \
            shapes["0.bias"] != (w0[0],) or shapes["2.bias"] != (w2[0],) or shapes["4.bias"] != (1,):
        return f"the MLP head's shapes do not chain ({', '.join(f'{k} {v}' for k, v in shapes.items())})"
    if width is not None and w0[1] != width:
        return f"the MLP head takes {w0[1]}-wide embeddings, not the model's {width}"
    return None


def check_bundle(folder: Path, *, known_models: set[str]) -> Any:
    """Validate an uploaded head bundle fully, through the public API; return the `Head`.

    Reads it with `scdrugmap.read_head` (after `scdrugmap.web.storage` checked the safetensors header:
    dtypes, shapes and offsets), then checks the kind against the model (LoRA only for models with
    LoRA targets), the tensor names of that kind, their shapes against each other and the model's
    embedding width, and applies the head to a few cells: a frozen head to zero embeddings, a
    baseline's head (with its fitted genes and components) to a tiny data set through `scdrugmap.tl.predict`.

    Raises
    ------
    UploadRejected
        422 with the reason, naming the tensor or field.
    """
    import numpy as np

    from scdrugmap.errors import ScDrugMapError
    from scdrugmap.readwrite import read_head
    from scdrugmap.registry import model_card
    from scdrugmap.web.storage import UploadRejected

    try:
        head = read_head(folder)
    except ScDrugMapError as err:
        raise UploadRejected(422, str(err).replace(str(folder), "the bundle")) from err
    if head.model not in known_models:
        raise UploadRejected(422, f"{BUNDLE_META}: model {head.model!r} is not known here.")
    try:
        card = model_card(head.model)
    except (ImportError, ScDrugMapError) as err:
        raise UploadRejected(422, f"model {head.model} is not available on this server.") from err
    names = set(head.head_tensors) | {n for n in head.tensors if n.startswith("encoder.")}
    try:
        head.trust_kit()  # calibration, conformal sets and OOD reference, when the head carries them
    except (ScDrugMapError, KeyError, ValueError, TypeError) as err:
        raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: the trust kit (calibration, conformal sets, OOD reference) "
                                  f"cannot be read ({str(err)[:200]}).") from err
    width = head.meta.get("embedding_dim")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool)
                              or not 0 <= width <= MAX_EMBEDDING_DIM):
        raise UploadRejected(422, f"{BUNDLE_META}: embedding_dim {str(width)[:40]} is not a width.")
    model_width = card.embedding_dim if card.family != "baseline" else None
    if head.kind == "lora":
        if not card.lora_targets:
            raise UploadRejected(422, f"{BUNDLE_META}: kind 'lora' on {head.model}, a {card.family} model without "
                                      "LoRA adapters; LoRA bundles exist for foundation models only.")
        adapters = sorted(n for n in names if n.startswith("adapter."))
        others = sorted(names - set(adapters) - {n for n in names if n.startswith("head.")})
        if not adapters or others:
            raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: a LoRA bundle holds adapter.* and head.* tensors only; "
                                      f"found {(others or ['no adapter.* tensor'])[:3]}.")
        untargeted = [n for n in adapters if not any(t in n for t in card.lora_targets)]
        if untargeted:
            raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: adapters {untargeted[:3]} are not on {head.model}'s LoRA "
                                      f"targets ({', '.join(card.lora_targets)}).")
        problem = _mlp_problem({n[len("head."):]: v for n, v in head.tensors.items() if n.startswith("head.")},
                               model_width)
        if problem:
            raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: {problem}.")
        return head
    state = head.head_tensors
    expected = MLP_KEYS if head.kind == "mlp" else LOGISTIC_KEYS
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: a {head.kind} head holds {list(expected)}; missing "
                                  f"{missing[:4]}, unexpected {unexpected[:4]}.")
    if len(state) != len(names) and card.family != "baseline":
        raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: encoder.* tensors belong to baseline heads, not {head.model}.")
    if width is None:
        raise UploadRejected(422, f"{BUNDLE_META}: needs 'embedding_dim'.")
    if model_width is not None and width != model_width:
        raise UploadRejected(422, f"{BUNDLE_META}: the head takes {width}-wide embeddings but {head.model} makes "
                                  f"{model_width}-wide ones.")
    if head.kind == "mlp":
        problem = _mlp_problem(state, width)
        if problem:
            raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: {problem}.")
    try:
        probability = head.predict_proba(np.zeros((2, width), dtype=np.float32))
        if probability.shape != (2,) or not np.isfinite(probability).all():
            raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: the head gives no probability for plain input (NaN or "
                                      "inf weights).")
        if card.family == "baseline":
            _dry_run(head)
    except (ScDrugMapError, KeyError, ValueError, IndexError, TypeError) as err:
        reason = str(err).replace(str(folder), "the bundle").splitlines()[0] if str(err) else err.__class__.__name__
        raise UploadRejected(422, f"{BUNDLE_WEIGHTS}: the head cannot be applied ({reason[:200]}).") from err
    return head


#: Genes of the dry run's cells when the head carries none.
DRY_RUN_GENES = ("ACTB", "GAPDH")


def _dry_run(head: Any) -> None:
    """Predict three tiny cells with a baseline's head through `scdrugmap.tl.predict` (its genes and components).

    The cells express the head's fitted genes (``encoder.genes``, fixed-width UTF-8 as bundles store
    them), a few counts each, so that only a damaged state can fail.
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    from scdrugmap import tl

    raw = head.tensors.get("encoder.genes")
    genes = list(DRY_RUN_GENES)
    if raw is not None and raw.ndim == 2 and raw.dtype == np.uint8 and raw.shape[0]:
        genes = list(dict.fromkeys(np.char.decode(np.ascontiguousarray(raw).view(f"S{raw.shape[1]}").ravel(),
                                                  "utf-8", errors="replace")))
    counts = (np.arange(3 * len(genes)).reshape(3, -1) % 5 + 1).astype(np.float32)
    cells = ad.AnnData(counts, obs=pd.DataFrame(index=["a", "b", "c"]), var=pd.DataFrame(index=genes))
    tl.predict(cells, head)
