"""A trained head as one object: what it was trained on, its weights, and how to apply it.

On disk a head is a folder (a "bundle") with ``head.json`` (kind, model, weights sha256,
strategy, training facts) and ``head.safetensors`` (head weights; the fitted genes and
components of a baseline as ``encoder.*``; LoRA adapters as ``adapter.*`` and the head as
``head.*``). No pickle is involved, and bundles written by earlier versions read unchanged.

Frozen heads (``mlp``, ``logistic``) are applied in numpy: the arithmetic is three small
matrix products, so predicting with them never needs torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from scdrugmap.errors import CheckpointError

if TYPE_CHECKING:
    import numpy.typing as npt

    from scdrugmap.train.trust import TrustKit

#: The two files of a bundle folder.
META_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
#: Prefix of the tensors that hold a baseline encoder's fitted state (genes, components).
ENCODER_PREFIX = "encoder."
#: The head's gene space: harmonised ids of the genes it depends on, as fixed-width UTF-8 bytes.
GENES_TENSOR = "genes.ids"
#: Prefixes of the trust kit's tensors (see `scdrugmap.train.trust`).
TRUST_PREFIXES = ("calibration.", "conformal.", "ood.")
HEAD_KINDS = ("mlp", "logistic", "lora")
HeadKind = Literal["mlp", "logistic", "lora"]


def encode_names(names: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Return text as a (names x width) uint8 array of UTF-8 bytes, so safetensors can hold it."""
    text = np.asarray(names).astype(str)
    if text.size == 0:
        return np.zeros((0, 1), dtype=np.uint8)
    raw = np.char.encode(text, "utf-8")
    return raw.view(np.uint8).reshape(text.size, -1)


def decode_names(raw: npt.ArrayLike) -> npt.NDArray[np.str_]:
    """Invert `encode_names`."""
    array = np.ascontiguousarray(np.asarray(raw, dtype=np.uint8))
    if array.shape[0] == 0:
        return np.asarray([], dtype=str)
    return np.char.decode(array.view(f"S{array.shape[1]}").ravel(), "utf-8").astype(str)


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """Return a digest of a fitted encoder state (names, dtypes, shapes and bytes), order-independent."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = np.ascontiguousarray(np.asarray(state[name]))
        if value.dtype.kind in "OU":
            value = np.asarray([str(v) for v in value.ravel()], dtype="U")
        digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


@dataclass
class Head:
    """A trained classification head on one model's cells, with its facts.

    Attributes
    ----------
    meta
        The facts of ``head.json``: ``kind`` (mlp, logistic, lora), ``model``, ``checkpoint_sha256``,
        ``strategy``, ``embedding_dim``, ``layer``, cell counts, training records, creation time.
    tensors
        Weights by name, as numpy arrays (float32, or strings for a baseline's gene names).
    path
        The folder it was read from or last saved to (None for a head only in memory).
    """

    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None

    # --- facts ---------------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return str(self.meta["kind"])

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def strategy(self) -> str:
        return str(self.meta.get("strategy", "lora" if self.kind == "lora" else "frozen"))

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.meta.get("checkpoint_sha256")

    @property
    def gene_ids(self) -> npt.NDArray[np.str_] | None:
        """Harmonised ids of the genes the head depends on (None for a head of an earlier version)."""
        return decode_names(self.tensors[GENES_TENSOR]) if GENES_TENSOR in self.tensors else None

    @property
    def value_kind(self) -> str | None:
        """The value kind of the training data (`scdrugmap.data.schema.detect_value_kind`), if recorded."""
        return self.meta.get("value_kind")

    def trust_kit(self) -> TrustKit:
        """Return the head's calibrator, conformal predictor and OOD detector (None parts for older heads)."""
        from scdrugmap.train.trust import TrustKit

        return TrustKit.from_bundle(self.tensors, self.meta.get("trust"))

    @property
    def head_tensors(self) -> dict[str, np.ndarray]:
        """The classifier's own weights: every tensor but a baseline's fitted state, the trust kit and the
        gene space (for a LoRA head: its ``adapter.*`` and ``head.*`` tensors)."""
        skip = (ENCODER_PREFIX, *TRUST_PREFIXES)
        return {k: v for k, v in self.tensors.items() if not k.startswith(skip) and k != GENES_TENSOR}

    @property
    def encoder_state(self) -> dict[str, np.ndarray]:
        """The baseline encoder's fitted state (empty for foundation models and LoRA heads)."""
        return {k[len(ENCODER_PREFIX):]: v for k, v in self.tensors.items() if k.startswith(ENCODER_PREFIX)}

    @property
    def encoder_state_sha256(self) -> str | None:
        state = self.encoder_state
        return state_sha256(state) if state else None

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (f"Head(kind={self.kind!r}, model={self.model!r}, strategy={self.strategy!r}, "
                f"n_cells={self.meta.get('n_cells')}{where})")

    # --- files ---------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the bundle folder ``path`` (created if needed), each file atomically; return it."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, value in self.tensors.items():
            array = np.asarray(value)
            if array.dtype.kind in "OU":  # gene names: safetensors holds numbers only
                msg = f"tensor {name!r} holds text; encode it before saving"
                raise CheckpointError(msg)
            tensors[name] = np.ascontiguousarray(array)
        save_file(tensors, str(path / (WEIGHTS_FILE + ".tmp")))
        os.replace(path / (WEIGHTS_FILE + ".tmp"), path / WEIGHTS_FILE)
        (path / (META_FILE + ".tmp")).write_text(json.dumps(self.meta, indent=1, default=str))
        os.replace(path / (META_FILE + ".tmp"), path / META_FILE)
        self.path = path
        return path

    @classmethod
    def read(cls, path: str | Path) -> Head:
        """Read a bundle folder written by `save` (or by ``scdrugmap train`` of any version).

        Raises
        ------
        CheckpointError
            When a file is missing, the JSON is not a head's, or the weights are not a safetensors file.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        if not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            msg = f"{path}: not a head bundle (needs {META_FILE} and {WEIGHTS_FILE}); train one with `scdrugmap train`."
            raise CheckpointError(msg)
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            msg = f"{path / META_FILE}: not valid JSON ({err.__class__.__name__}); the bundle is damaged."
            raise CheckpointError(msg) from err
        if not isinstance(meta, dict) or meta.get("kind") not in HEAD_KINDS or not meta.get("model"):
            msg = f"{path / META_FILE}: needs 'kind' (one of {', '.join(HEAD_KINDS)}) and 'model'."
            raise CheckpointError(msg)
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError) as err:
            msg = f"{path / WEIGHTS_FILE}: not a readable safetensors file ({err}); the bundle is damaged."
            raise CheckpointError(msg) from err
        return cls(meta=meta, tensors=tensors, path=path)

    # --- applying a frozen head ----------------------------------------------------------------------------

    def predict_logits(self, embeddings: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Return the head's logit of sensitivity per row of ``embeddings`` (NaN rows give NaN), mlp or logistic.

        Logits keep the ranking where probabilities saturate (a sigmoid in float32 rounds every logit below
        about -100 to exactly 0), so calibration starts from them.

        Raises
        ------
        CheckpointError
            For a LoRA head (it needs the network: use `scdrugmap.tl.predict`), or when the width of
            ``embeddings`` is not the head's.
        """
        X = np.asarray(embeddings, dtype=np.float32)
        if self.kind == "lora":
            msg = "a LoRA head scores tokens through its adapted network, not embeddings; use scdrugmap.tl.predict."
            raise CheckpointError(msg)
        width = int(self.meta.get("embedding_dim") or X.shape[1])
        if X.ndim != 2 or X.shape[1] != width:
            msg = f"the head takes {width}-wide {self.model} embeddings; got shape {X.shape}."
            raise CheckpointError(msg)
        logits = np.full(X.shape[0], np.nan, dtype=np.float64)
        keep = ~np.isnan(X).any(axis=1) if X.shape[1] else np.ones(X.shape[0], dtype=bool)
        if self.kind == "logistic":
            t = self.tensors
            logits[keep] = ((X[keep].astype(np.float64) - t["mean"]) / t["scale"]) @ t["coef"] + float(t["intercept"][0])
        else:
            logits[keep] = mlp_logits(self.tensors, X[keep])
        return logits

    def predict_proba(self, embeddings: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Return the head's (uncalibrated) P(sensitive) per row of ``embeddings``; see `predict_logits`."""
        return sigmoid(self.predict_logits(embeddings))


#: Cells per block of `mlp_logits` (1,024 x a hidden width of 512: 2 MB of float32 per layer).
MLP_BLOCK = 1024


def mlp_logits(state: dict[str, np.ndarray], X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Apply the paper's MLP (``nn.Sequential`` keys 0/2/4) in float32 numpy; return one logit per row.

    Blocks of `MLP_BLOCK` rows run on one thread per CPU with one BLAS thread each
    (`scdrugmap.train._blocks.map_row_blocks`); a row's logit does not depend on the thread (blocks are
    fixed by the row count), and equals one product of all rows within float32 rounding. Each thread
    computes its blocks' hidden layers in two arrays of its own, in place: new 2 MB arrays per layer and
    block cost more in page faults than the additions and maxima take.
    """
    import threading

    from scdrugmap.train._blocks import map_row_blocks

    out = np.empty(X.shape[0], dtype=np.float32)
    first, second = state["0.weight"].T, state["2.weight"].T
    local = threading.local()

    def fill(start: int, stop: int) -> None:
        if not hasattr(local, "hidden"):
            rows = min(MLP_BLOCK, X.shape[0])
            local.hidden = (np.empty((rows, first.shape[1]), dtype=np.float32),
                            np.empty((rows, second.shape[1]), dtype=np.float32))
        h = np.matmul(X[start:stop], first, out=local.hidden[0][: stop - start])
        h += state["0.bias"]
        np.maximum(h, 0, out=h)
        h2 = np.matmul(h, second, out=local.hidden[1][: stop - start])
        h2 += state["2.bias"]
        np.maximum(h2, 0, out=h2)
        out[start:stop] = (h2 @ state["4.weight"].T + state["4.bias"]).reshape(-1)

    map_row_blocks(fill, X.shape[0], MLP_BLOCK)
    return out


def sigmoid(z: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Return 1 / (1 + exp(-z)) as float32 (NaN stays NaN)."""
    z = np.asarray(z)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-z.astype(np.float64)))).astype(np.float32)


def read_head(path: str | Path) -> Head:
    """Read a head bundle folder (see `Head.read`)."""
    return Head.read(path)
