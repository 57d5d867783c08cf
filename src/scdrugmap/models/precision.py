"""The dtype a model's forward passes run in: float32 by default on the CPU, bfloat16 where its parity holds.

``dtype`` is asked for by name (`DTYPES`) and resolved per model and device by `resolve_dtype`:

``auto``
    the model's documented default for the device (`default_dtype`): float32 on the CPU for every model;
    on CUDA the official inference's mixed precision (`TorchEncoder.gpu_autocast`: scGPT float16), else
    float32.
``float32``
    full precision everywhere (also turns off the CUDA default, for parity checks).
``bfloat16``
    ``torch.autocast`` in bfloat16 (matmuls and attention in bfloat16; norms, softmax and CellPLM's Gumbel
    latent in float32; weights kept in float32), or, for the language models, the network cast to bfloat16
    (`TorchEncoder.bfloat16_mode`). Allowed only for a model whose measured parity with float32
    (`MEASURED_PARITY`, from ``benchmarks/bench_bf16.py``) holds (`MIN_COSINE`, `MAX_AUROC_DELTA`); the
    others refuse it with the numbers and the reason. Embeddings are returned as float32 either way.

Baselines (pca, hvg, majority) have no network: they compute in numpy float32 whatever is asked, so a
benchmark that carries them runs with ``--dtype bfloat16``; they record ``float32``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

from scdrugmap.errors import ConfigError

if TYPE_CHECKING:
    from scdrugmap.models.base import Encoder

log = logging.getLogger(__name__)

Dtype = Literal["auto", "float32", "bfloat16"]
#: What a forward pass runs in once resolved (float16: scGPT's official autocast on CUDA).
RunDtype = Literal["float32", "bfloat16", "float16"]
#: The dtypes that can be asked for.
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")

#: Smallest mean cosine similarity of a cell's bfloat16 and float32 embeddings, both centred on the float32
#: mean embedding of the cells, that bfloat16 must keep on the golden cells and on the demo. Centred, because
#: networks give every cell nearly the same vector (random-weight ones above all): the raw cosine stays above
#: 0.997 for every model measured, even where rounding is a quarter of what tells cells apart (scGPT). The
#: mean over cells, because the minimum falls as cells are added (scBERT: 0.9935 over 16 demo cells, 0.9814
#: over 98). 0.995 is rounding of about a tenth of a cell's own signal, on average. Measured
#: (`MEASURED_PARITY`): the models that pass keep 0.9986 or more and change the demo AUROC by 0.0022 at
#: most; those that fail keep 0.9946 or less, and all but scBERT also change the AUROC by more than
#: `MAX_AUROC_DELTA`.
MIN_COSINE = 0.995
#: Largest allowed change of the logistic frozen head's mean AUROC on the demo (bfloat16 minus float32
#: embeddings, the same folds). The logistic fit is convex, so its AUROC moves only as far as the embeddings
#: do; the demo's MLP head moves by up to 0.09 when only its seed changes, so its change says little.
MAX_AUROC_DELTA = 0.01


@dataclass(frozen=True)
class BFloat16Parity:
    """bfloat16 against float32 for one model, as measured on the CPU by ``benchmarks/bench_bf16.py``.

    Attributes
    ----------
    golden_cosine
        Mean per-cell centred cosine (see `MIN_COSINE`) on the golden cells (tiny random weights).
    demo_cosine
        The same on the demo collection at the published width (random weights, few layers).
    auroc_delta
        The logistic frozen head's mean AUROC on the demo with bfloat16 embeddings minus with float32 ones
        (None where too few demo cells could be embedded at the published width on a CPU).
    speedup
        float32 time / bfloat16 time of the forward passes at the published width on the CPU.
    reason
        Why bfloat16 is refused when the numbers alone do not say it (empty otherwise).
    """

    golden_cosine: float
    demo_cosine: float
    auroc_delta: float | None
    speedup: float
    reason: str = ""

    def failures(self) -> list[str]:
        """Return what fails the thresholds (`MIN_COSINE`, `MAX_AUROC_DELTA`) and `reason`; empty when it holds."""
        found = []
        if self.golden_cosine < MIN_COSINE:
            found.append(f"golden-cell mean centred cosine {self.golden_cosine:.4f} < {MIN_COSINE}")
        if self.demo_cosine < MIN_COSINE:
            found.append(f"demo mean centred cosine {self.demo_cosine:.4f} < {MIN_COSINE}")
        if self.auroc_delta is not None and abs(self.auroc_delta) > MAX_AUROC_DELTA:
            found.append(f"|demo AUROC change| {abs(self.auroc_delta):.4f} > {MAX_AUROC_DELTA}")
        if self.reason:
            found.append(self.reason)
        return found

    @property
    def holds(self) -> bool:
        return not self.failures()

    def summary(self) -> str:
        """Return the measured parity in one line (shown by ``models info`` and in refusals)."""
        auroc = "not measured" if self.auroc_delta is None else f"{self.auroc_delta:+.4f}"
        return (f"mean centred cosine {self.golden_cosine:.4f} on the golden cells, {self.demo_cosine:.4f} on the "
                f"demo; demo AUROC change {auroc}; CPU speed-up x{self.speedup:.2f}")


def default_dtype(cls: type[Encoder], device: str) -> RunDtype:
    """Return the dtype ``auto`` means for model class ``cls`` on ``device`` ("cpu", "cuda", "cuda:1")."""
    if device.startswith("cuda"):
        return cast("RunDtype", getattr(cls, "gpu_autocast", None) or "float32")
    return "float32"


def resolve_dtype(cls: type[Encoder], dtype: str | None, device: str) -> RunDtype:
    """Return the dtype model class ``cls`` runs in on ``device`` when ``dtype`` is asked for.

    Parameters
    ----------
    cls
        The encoder class (a baseline, without a network, always gives ``float32``).
    dtype
        One of `DTYPES`; None means ``auto``.
    device
        The resolved device, ``cpu`` or ``cuda[:N]``.

    Returns
    -------
    ``float32``, ``bfloat16`` or ``float16`` (the CUDA default of scGPT).

    Raises
    ------
    ConfigError
        When ``dtype`` is not one of `DTYPES`, or the model refuses bfloat16 (naming its measured parity
        and the reason).
    """
    from scdrugmap.models.base import TorchEncoder

    name = (dtype or "auto").strip().lower()
    if name not in DTYPES:
        msg = f"--dtype {dtype} is not available; choose from {', '.join(DTYPES)}."
        raise ConfigError(msg)
    if not issubclass(cls, TorchEncoder):
        if name == "bfloat16":
            log.info("%s has no network: it computes in float32 whatever --dtype says", cls.name)
        return "float32"
    if name == "auto":
        return default_dtype(cls, device)
    if name == "bfloat16":
        refuse_bfloat16(cls)
    return cast("RunDtype", name)


def parity_of(cls: type[Encoder]) -> BFloat16Parity | None:
    """Return the measured bfloat16 parity of ``cls``: its own `TorchEncoder.bfloat16_parity` (a plug-in's),
    else the built-in model's row of `MEASURED_PARITY`; None when never measured."""
    declared = getattr(cls, "bfloat16_parity", None)
    return declared if declared is not None else MEASURED_PARITY.get(cls.name)


def refuse_bfloat16(cls: type[Encoder]) -> None:
    """Raise unless the model's measured bfloat16 parity holds (`parity_of`).

    Raises
    ------
    ConfigError
        Naming the model, its measured parity, what fails and the fix.
    """
    parity = parity_of(cls)
    if parity is None:
        msg = (f"{cls.name} refuses --dtype bfloat16: its parity with float32 was never measured "
               "(benchmarks/bench_bf16.py measures it; a plug-in declares it as bfloat16_parity). Use --dtype float32.")
        raise ConfigError(msg)
    if not parity.holds:
        msg = (f"{cls.name} refuses --dtype bfloat16: {'; '.join(parity.failures())} (measured: {parity.summary()}; "
               f"thresholds: mean centred cosine >= {MIN_COSINE}, |AUROC change| <= {MAX_AUROC_DELTA}). "
               "Use --dtype float32.")
        raise ConfigError(msg)


#: bfloat16 against float32 per built-in model, measured on the CPU by ``benchmarks/bench_bf16.py --repeats 2``
#: (AMD EPYC with AVX512-BF16, 2 threads, load average 5-8 from other jobs; the README's dtype section has the
#: table): golden cells with the golden tiny checkpoints; the demo at the published width with 2 layers and
#: random weights (MiniLM: its published weights), a random subset of 600 demo cells or fewer for slow models.
#: scBERT's demo row comes from a second run on 98 demo cells (``--models scbert --tiers wide --cells-for
#: scbert=100 --repeats 1``). Cosines are rounded down to 4 decimals.
MEASURED_PARITY: dict[str, BFloat16Parity] = {
    "celllm": BFloat16Parity(golden_cosine=0.9998, demo_cosine=0.9916, auroc_delta=-0.0176, speedup=2.28),
    "cellplm": BFloat16Parity(golden_cosine=0.9999, demo_cosine=0.9999, auroc_delta=0.0002, speedup=2.61),
    "geneformer": BFloat16Parity(golden_cosine=0.9990, demo_cosine=0.9988, auroc_delta=-0.0022, speedup=1.14),
    "llm": BFloat16Parity(golden_cosine=0.9999, demo_cosine=0.9998, auroc_delta=-0.0020, speedup=2.30),
    "minilm": BFloat16Parity(golden_cosine=0.9989, demo_cosine=0.9991, auroc_delta=0.0009, speedup=1.69),
    "scbert": BFloat16Parity(golden_cosine=0.9998, demo_cosine=0.9938, auroc_delta=-0.0024, speedup=2.19),
    "scfoundation": BFloat16Parity(golden_cosine=0.9994, demo_cosine=0.9998, auroc_delta=-0.0010, speedup=2.20),
    "scgpt": BFloat16Parity(golden_cosine=0.9978, demo_cosine=0.9621, auroc_delta=0.0153, speedup=0.94),
    "tgpt": BFloat16Parity(golden_cosine=0.9998, demo_cosine=0.9986, auroc_delta=-0.0003, speedup=2.14),
    "uce": BFloat16Parity(golden_cosine=0.9945, demo_cosine=0.9906, auroc_delta=-0.0120, speedup=1.71),
}
