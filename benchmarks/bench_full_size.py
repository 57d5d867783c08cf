"""Benchmark memory at full size on one machine: every stage of the pipeline, each in a fresh process.

The primary collection's full size (326,751 cells x 20,000 genes, about 4 GB on disk) is streamed to
``--path`` by the simulator, then each stage runs on it, reading expression from disk in chunks:

* ``simulate``: `simulate_collection` writes the file (skipped when ``--path`` exists with the right shape);
* ``check``: ``read_h5ad(path, backed=True)`` and `check_adata` (row chunks), as ``scdrugmap check`` does;
* ``embed-pca``, ``embed-hvg``: the baseline's ``embed`` on the backed file (unfitted: it selects genes,
  and for pca fits the components, on these cells, as the benchmark does), read in row blocks; the
  embedding is saved as ``.npy`` in the run folder;
* ``tokenize``: Geneformer V2 tokenisation of the whole file with `GeneformerTokenizer.tokenize_h5ad`, the
  official gc95M dictionaries from ``../shared/vocab/geneformer_v2`` (genes matched by ``var['ensembl_id']``,
  which the simulator writes, through the official Ensembl mapping dictionary);
* ``benchmark``: the frozen-head 10-fold pooled benchmark through the real runner (`run_benchmark`) over
  ``--categories`` (all four by default), one fresh process per model of ``--models`` (majority, pca,
  geneformer, hvg: ``benchmark:<model>``), all writing into one run folder as a resumed run would, so each
  model's peak memory is its own (in one process for all models the runner frees a model's embeddings before
  the next model's, so the peak is about the largest of these). pca and hvg are embedded by the runner (a
  cache miss: they read the backed file in row blocks and write each block into the cache file); every
  model's embeddings then stay in that file and the heads read each batch's rows from it,
  so hvg's (cells x 2,000) float32 embedding (2.6 GB at full size) is never in memory whole. Geneformer
  comes from the embedding cache. Embedding every cell with Geneformer on a CPU is out of reach
  (a few cells/s), so a setup step (``cache``, reported on its own line) first fills the cache as a previous
  run, or ``scdrugmap embed`` on a GPU cluster, would have: it writes a random-weight Geneformer-V1-10M
  checkpoint folder (official layout, V1 dictionaries beside it), loads it as the runner does, computes the
  runner's cache key from the chunked data fingerprint, and writes a (cells x 256) float32 STAND-IN
  embedding: random normal values with a planted signal (8 dimensions shifted by +-0.25 sd with the
  response), not Geneformer's output, plus the cache's ``.json`` facts. The run must then report cache
  ``hit`` for geneformer in ``models.json``; its AUROC measures the planted signal, nothing about
  Geneformer;
* ``report``: `write_report` of the benchmark's run folder (HTML and PNG), as ``scdrugmap report`` does (with
  its figure worker, whose memory counts with the stage's).

Every stage runs in a fresh child process (``--stage NAME``), so one stage's memory never counts for
another. The child reports its wall time (the stage's work, after imports), its peak resident memory
(``ru_maxrss``; with any process it starts, such as the report's figure worker, the largest sum of their
``VmRSS``) and the largest ``VmRSS`` a thread read every 20 ms, next to its resident memory before
the work (interpreter and imports), and the load average when it started (this machine is shared). One
JSON line is printed per stage, then a table; ``--json`` also writes them all to a file. The goal of issue
17 is a peak under 3 GB (3e9 bytes) for every stage: the script exits with status 1 naming the stages
that miss it.

``SCDRUGMAP_HOME`` points into the run folder (``--run-dir``, default beside ``--path``), so nothing
leaks into the user's cache; the run folder and a file this run simulated are deleted at the end unless
``--keep``.

Usage::

    python benchmarks/bench_full_size.py --cells 20000 --path /tmp/scdrugmap-full/small.h5ad   # a quick look
    python benchmarks/bench_full_size.py --keep --json /tmp/bench_full_size.json   # full size; keep the file
    python benchmarks/bench_full_size.py --stages benchmark --categories tissue,cancer_type --epochs 10
    python benchmarks/bench_full_size.py --keep --stages benchmark,report --models hvg --add-models  # one more model
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from _common import FULL_CELLS, FULL_GENES

STAGES = ("simulate", "check", "embed-pca", "embed-hvg", "tokenize", "benchmark", "report")
#: The limit issue 17 sets for every stage at full size: 3 GB.
LIMIT_BYTES = 3e9
#: The benchmark's models, cheapest first (so each model's sampled peak is its own).
BENCHMARK_MODELS = ("majority", "pca", "geneformer", "hvg")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_VOCAB = REPO.parent / "shared" / "vocab"
STAND_IN = ("geneformer embeddings are a STAND-IN: random normal values with a planted signal, written to the "
            "cache under the runner's key for a random-weight Geneformer-V1-10M checkpoint; not Geneformer's output")
#: Planted signal of the cached embeddings: this many dimensions shifted by +-SIGNAL_SHIFT (unit noise).
SIGNAL_DIMS = 8
SIGNAL_SHIFT = 0.25
EMBEDDING_DIM = 256  # Geneformer-V1-10M hidden size
MIB = 2**20


# --- measuring a child ------------------------------------------------------------------------------------

def _rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # the process has ended
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """Return the processes started by ``pid`` and by them (a report's figure worker), from /proc."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in children.read_text().split()]
        except OSError:
            continue
    return found + [grandchild for child in found for grandchild in _descendants(child)]


def _tree_rss_bytes() -> int:
    """Return the resident memory of this process and every process it started, together."""
    return _rss_bytes() + sum(_rss_bytes(child) for child in _descendants(os.getpid()))


class PeakSampler:
    """Track the largest VmRSS of this process, and of it with its child processes, read every 20 ms by a thread."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval, self.peak, self._done = interval, _rss_bytes(), threading.Event()
        self.tree_peak = self.peak
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())
            self.tree_peak = max(self.tree_peak, _tree_rss_bytes())

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measured(stage: str, work, *args) -> dict:
    """Run ``work(*args, sampler)`` (returning a dict of facts) and add wall/CPU time and memory figures."""
    rss_before, load = _rss_bytes(), os.getloadavg()[0]
    with PeakSampler() as sampler:
        started, cpu_started = time.perf_counter(), time.process_time()
        facts = work(*args, sampler)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = max(own, sampler.tree_peak)  # a report's figure worker counts with its parent
    return {"stage": stage, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "load_average": round(load, 2), "rss_before_mib": round(rss_before / MIB, 1),
            "peak_rss_mib": round(peak / MIB, 1), "peak_rss_bytes": int(peak),
            "peak_own_rss_mib": round(own / MIB, 1),
            "peak_children_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "peak_vmrss_sampled_mib": round(sampler.peak / MIB, 1),
            "peak_tree_sampled_mib": round(sampler.tree_peak / MIB, 1), "under_3gb": bool(peak < LIMIT_BYTES),
            **facts}


# --- the stages (each in its own child process) -----------------------------------------------------------

def _h5_shape(path: Path) -> tuple[int, int]:
    import h5py

    with h5py.File(path, "r") as handle:
        node = handle["X"]
        shape = node.shape if isinstance(node, h5py.Dataset) else node.attrs["shape"]  # dense, or CSR group
        return int(shape[0]), int(shape[1])


def stage_simulate(args: argparse.Namespace, sampler: PeakSampler) -> dict:
    from scdrugmap.data.simulate import simulate_collection

    path = Path(args.path)
    if path.exists():
        shape = _h5_shape(path)
        if shape != (args.cells, args.genes):
            raise SystemExit(f"{path} holds {shape[0]} cells x {shape[1]} genes, not {args.cells} x {args.genes}; "
                             "delete it or pass another --path.")
        return {"skipped": "the file exists", "cells": shape[0], "genes": shape[1],
                "file_gib": round(path.stat().st_size / 2**30, 3)}
    simulate_collection(n_cells=args.cells, n_genes=args.genes, seed=args.seed, out_path=path)
    return {"cells": args.cells, "genes": args.genes, "file_gib": round(path.stat().st_size / 2**30, 3),
            "simulated": True}


def stage_check(args: argparse.Namespace, sampler: PeakSampler) -> dict:
    from scdrugmap.data.check import check_adata
    from scdrugmap.data.io import read_h5ad

    adata = read_h5ad(args.path, backed=True)
    report = check_adata(adata, source=str(args.path), n_folds=args.folds, chunk_rows=args.chunk_rows)
    nnz = int(adata.X.group["indptr"][-1]) if hasattr(adata.X, "group") else None
    adata.file.close()
    n_cells = report.facts["shape"][0]
    return {"cells": n_cells, "genes": report.facts["shape"][1], "nonzeros": nnz,
            "value_kind": report.facts.get("value_kind"), "errors": len(report.errors),
            "warnings": len(report.problems) - len(report.errors), "chunk_rows": args.chunk_rows}


def stage_embed(args: argparse.Namespace, sampler: PeakSampler) -> dict:
    """Embed every cell with a baseline (unfitted: genes and components fitted on these cells), backed."""
    import numpy as np

    from scdrugmap.data.io import read_h5ad
    from scdrugmap.models.base import load_encoder
    from scdrugmap.models.baselines import CHUNK_ROWS

    model = args.stage.removeprefix("embed-")
    adata = read_h5ad(args.path, backed=True)
    encoder = load_encoder(model)
    embeddings = encoder.embed(adata)
    n_cells = adata.n_obs
    adata.file.close()
    path = _run_dir(args) / f"{model}-embeddings.npy"
    np.save(path, embeddings, allow_pickle=False)
    return {"cells": n_cells, "model": model, "dim": int(embeddings.shape[1]),
            "embedding_mib": round(embeddings.nbytes / MIB, 1), "saved": str(path), "chunk_rows": CHUNK_ROWS}


def _v2_vocabulary(vocab_dir: Path):
    from scdrugmap.models.geneformer import GeneformerVocabulary

    folder = vocab_dir / "geneformer_v2"
    return GeneformerVocabulary.from_files(folder / "token_dictionary_gc95M.pkl",
                                           folder / "gene_median_dictionary_gc95M.pkl",
                                           folder / "ensembl_mapping_dict_gc95M.pkl", version="V2")


def stage_tokenize(args: argparse.Namespace, tokenizer, sampler: PeakSampler) -> dict:
    tokens = tokenizer.tokenize_h5ad(args.path)
    lengths = tokens.lengths
    return {"cells": int(tokens.n_cells), "dropped_cells": len(tokens.dropped),
            "tokens": int(tokens.arrays["input_ids"].size),
            "token_bytes_mib": round(sum(a.nbytes for a in tokens.arrays.values()) / MIB, 1),
            "mean_length": round(float(lengths.mean()), 1), "max_length": int(lengths.max()),
            "chunk_size": tokenizer.chunk_size, "threads": tokenizer.n_threads}


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir) if args.run_dir else Path(args.path).with_name(Path(args.path).stem + "-bench")


def _write_checkpoint(folder: Path, vocab_dir: Path, seed: int) -> None:
    """A random-weight Geneformer-V1-10M folder in the official layout (config.json, model.safetensors, dictionaries)."""
    import torch
    from safetensors.torch import save_file

    from scdrugmap.models.geneformer import GeneformerConfig, build_geneformer_model

    folder.mkdir(parents=True, exist_ok=True)
    v1 = vocab_dir / "geneformer_v1"
    shutil.copyfile(v1 / "config.json", folder / "config.json")  # the published Geneformer-V1-10M config
    for name in ("geneformer_token_dictionary.pkl", "geneformer_gene_median_dictionary.pkl"):
        shutil.copyfile(v1 / name, folder / name)
    torch.manual_seed(seed)
    module = build_geneformer_model(GeneformerConfig.from_official(folder))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))


def stage_cache(args: argparse.Namespace, sampler: PeakSampler) -> dict:
    """Fill the embedding cache as a previous run would have: the runner's key, a planted signal."""
    import numpy as np

    from scdrugmap import config as paths
    from scdrugmap.data import schema
    from scdrugmap.data.io import data_fingerprint, read_h5ad
    from scdrugmap.models.base import load_encoder
    from scdrugmap.models.cache import embedding_key

    run = _run_dir(args)
    checkpoint = run / "Geneformer-V1-10M"
    _write_checkpoint(checkpoint, Path(args.vocab), args.seed)
    # exactly as the runner's _prepare_model: load_encoder(model, weights, device=..., **options minus device)
    encoder = load_encoder("geneformer", str(checkpoint), device="cpu")
    started = time.perf_counter()
    adata = read_h5ad(args.path, backed=True)
    fingerprint = data_fingerprint(adata, layer=None)
    fingerprint_seconds = time.perf_counter() - started
    labels = schema.encode_labels(adata.obs[schema.RESPONSE].to_numpy(), column=schema.RESPONSE, source=args.path)
    n_cells = adata.n_obs
    adata.file.close()
    key = embedding_key(encoder, fingerprint, layer=None, options={})
    folder = paths.embeddings_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{encoder.name}-{key}.npy"
    # written in row chunks through a memory map: the planting never holds the whole array
    out = np.lib.format.open_memmap(path.with_name(path.name + ".tmp.npy"), mode="w+", dtype=np.float32,
                                    shape=(n_cells, encoder.embedding_dim))
    rng = np.random.default_rng([args.seed, 8])
    for start in range(0, n_cells, 65_536):
        stop = min(start + 65_536, n_cells)
        block = rng.standard_normal((stop - start, encoder.embedding_dim), dtype=np.float32)
        block[:, :SIGNAL_DIMS] += np.where(labels[start:stop, None] == 1, SIGNAL_SHIFT, -SIGNAL_SHIFT)
        out[start:stop] = block
    out.flush()
    del out
    os.replace(path.with_name(path.name + ".tmp.npy"), path)
    # the facts cache.py writes beside the array (seconds and cells/s of an embedding never run here are 0)
    path.with_suffix(".json").write_text(json.dumps({"seconds": 0.0, "cells_per_second": 0.0, "n_cells": n_cells,
                                                     "dim": encoder.embedding_dim}))
    return {"cells": n_cells, "key": key, "checkpoint": str(checkpoint), "cache_file": str(path),
            "cache_mib": round(path.stat().st_size / MIB, 1), "fingerprint_seconds": round(fingerprint_seconds, 2),
            "signal": f"{SIGNAL_DIMS} dims shifted +-{SIGNAL_SHIFT} sd by response", "stand_in": STAND_IN}


def stage_benchmark(args: argparse.Namespace, sampler: PeakSampler) -> dict:
    """Run the frozen benchmark of one model (``--models``) into the shared run folder."""
    from scdrugmap.evaluate.grid import BenchmarkConfig
    from scdrugmap.evaluate.runner import run_benchmark

    run = _run_dir(args)
    out = run / "run"
    categories = [c for c in args.categories.split(",") if c]
    (model,) = [m for m in args.models.split(",") if m]
    config = BenchmarkConfig(data=str(args.path), out=str(out), models=[model], strategies=["frozen"],
                             scenarios=["pooled"], categories=categories, folds=args.folds, seed=args.seed,
                             device="cpu", weights={"geneformer": str(run / "Geneformer-V1-10M")},
                             model_options={"geneformer": {"device": "cpu"}}, head={"epochs": args.epochs})
    started = time.perf_counter()
    first_job: list[float] = []

    def progress(stage: str, done: int, total: int, detail: str) -> None:
        if stage == "jobs" and detail == model and not first_job:
            first_job.append(time.perf_counter() - started)

    results = run_benchmark(config, progress=progress)
    results = results[results["level"] == "cell"]  # one row per job (sample-level rows score the same jobs)
    facts = json.loads((out / "models.json").read_text()).get(model, {})
    if model == "geneformer" and facts.get("cache") != "hit":
        raise SystemExit(f"the runner did not hit the embedding cache for geneformer (cache={facts.get('cache')!r}); "
                         "the planted key does not match the runner's.")
    rows = results[results["model"] == model]
    done = rows[rows["status"] == "done"]
    return {"cells": _h5_shape(Path(args.path))[0], "model": model, "categories": categories, "epochs": args.epochs,
            "folds": args.folds, "cache": facts.get("cache"), "embed_seconds": facts.get("seconds"),
            "first_job_seconds": round(first_job[0], 1) if first_job else None, "jobs": len(rows),
            "done": len(done), "skipped": int((rows["status"] == "skipped").sum()),
            "failed": int((rows["status"] == "failed").sum()),
            "mean_auroc": round(float(done["auroc"].mean()), 4) if len(done) else None,
            "mean_auroc_by_category": {c: round(float(done.loc[done["category"] == c, "auroc"].mean()), 4)
                                       for c in categories},
            "note": STAND_IN if model == "geneformer" else None}


def stage_report(args: argparse.Namespace, sampler: PeakSampler) -> dict:
    from scdrugmap.report import write_report

    run = _run_dir(args) / "run"
    if not (run / "results.parquet").exists():
        raise SystemExit(f"{run}: no benchmark results; run the benchmark stage first.")
    written = write_report(run, formats=("html", "png"), jobs=None)  # as the command: a worker where 2 CPUs are free
    return {"files": len(written), "report_mib": round(sum(p.stat().st_size for p in written) / MIB, 1),
            "predictions_mib": round((run / "predictions.parquet").stat().st_size / MIB, 1)}


def child(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  [%(name)s] %(message)s")
    # library imports are not part of the stage's work (their memory is shown as rss_before_mib)
    import anndata  # noqa: F401
    import h5py  # noqa: F401
    import scipy.sparse  # noqa: F401

    if args.stage == "tokenize":
        from scdrugmap.models.geneformer import GeneformerTokenizer

        tokenizer = GeneformerTokenizer(_v2_vocabulary(Path(args.vocab)), chunk_size=args.token_chunk,
                                        n_threads=args.threads)
        result = measured("tokenize", stage_tokenize, args, tokenizer)
        result["cells_per_s"] = round(result["cells"] / result["seconds"], 1)
        result["cells_per_cpu_s"] = round(result["cells"] / result["cpu_seconds"], 1)
        result["vocabulary"] = "Geneformer V2 (gc95M)"
        result["genes_matched"] = _matched_genes(args.path, tokenizer)
    else:
        if args.stage in ("cache", "benchmark"):
            import torch  # noqa: F401
        work = {"simulate": stage_simulate, "check": stage_check, "embed-pca": stage_embed,
                "embed-hvg": stage_embed, "cache": stage_cache, "benchmark": stage_benchmark,
                "report": stage_report}[args.stage]
        result = measured(args.stage, work, args)
        if result.get("cells") and result["seconds"] and not result.get("skipped") and args.stage != "benchmark":
            result["cells_per_s"] = round(result["cells"] / result["seconds"], 1)
    print(json.dumps(result), flush=True)


def _matched_genes(path: str, tokenizer) -> int:
    import h5py
    import numpy as np
    from anndata.io import read_elem

    with h5py.File(path, "r") as handle:
        ids = np.asarray(read_elem(handle["var"]["ensembl_id"]), dtype=object)
    return tokenizer.vocabulary.plan_genes(ids).n_matched


# --- the parent -------------------------------------------------------------------------------------------

def _record(results: list[dict], result: dict, json_path: Path | None) -> None:
    """Print a stage's JSON line and keep it (in ``json_path`` too, rewritten after every stage)."""
    print(json.dumps(result), flush=True)
    results.append(result)
    if json_path:
        json_path.write_text(json.dumps(results, indent=1))


def run_stage(name: str, args: argparse.Namespace, env: dict, *, models: str | None = None) -> dict:
    command = [sys.executable, __file__, "--stage", name, "--cells", str(args.cells), "--genes", str(args.genes),
               "--path", str(args.path), "--run-dir", str(_run_dir(args)), "--seed", str(args.seed),
               "--folds", str(args.folds), "--epochs", str(args.epochs), "--categories", args.categories,
               "--models", models or args.models,
               "--chunk-rows", str(args.chunk_rows), "--token-chunk", str(args.token_chunk),
               "--vocab", str(args.vocab)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    label = f"benchmark:{models}" if name == "benchmark" else name
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"stage": label, "stage_failed": f"exit code {done.returncode}", "output": done.stdout[-2000:],
                "process_seconds": round(time.perf_counter() - started, 2)}
    result = json.loads(lines[-1])
    result["stage"] = label
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    return result


def _table(results: list[dict]) -> str:
    head = (f"{'stage':<22}{'wall s':>10}{'cells/s':>13}{'load':>6}{'RSS before MiB':>16}{'peak RSS MiB':>14}"
            f"{'peak sampled MiB':>18}{'< 3 GB':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        stage = "(cache)" if r["stage"] == "cache" else r["stage"]
        if "stage_failed" in r:
            rows.append(f"{stage:<22}  failed ({r['stage_failed']})")
            continue
        rate = f"{r['cells_per_s']:,.0f}" if r.get("cells_per_s") else "-"
        if r.get("mean_auroc") is not None:
            rate = f"AUROC {r['mean_auroc']:.3f}"
        rows.append(f"{stage:<22}{r['seconds']:>10,.1f}{rate:>13}{r['load_average']:>6.1f}{r['rss_before_mib']:>16,.0f}"
                    f"{r['peak_rss_mib']:>14,.0f}{r['peak_vmrss_sampled_mib']:>18,.0f}"
                    f"{'yes' if r['under_3gb'] else 'NO':>8}")
    if any(r["stage"] == "cache" for r in results):
        rows.append("(cache): setup of the benchmark, filling the embedding cache with geneformer's stand-in")
        rows.append(STAND_IN)
    rows.append(f"limit: {LIMIT_BYTES / 1e9:g} GB = {LIMIT_BYTES / MIB:,.0f} MiB of peak resident memory per stage")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=FULL_CELLS)
    parser.add_argument("--genes", type=int, default=FULL_GENES)
    parser.add_argument("--path", type=Path, default=Path("/tmp/scdrugmap-full/full.h5ad"),
                        help="the .h5ad; simulated there when missing")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--keep", action="store_true",
                        help="keep the file this run simulated and the run folder (checkpoint, cache, results)")
    parser.add_argument("--categories", default="tissue,cancer_type,therapy,regimen",
                        help="benchmark categories (comma list of tissue, cancer_type, therapy, regimen)")
    parser.add_argument("--models", default=",".join(BENCHMARK_MODELS),
                        help="benchmark models (comma list; geneformer comes from the stand-in cache)")
    parser.add_argument("--epochs", type=int, default=10, help="MLP head epochs (the paper's 10)")
    parser.add_argument("--add-models", action="store_true",
                        help="add --models to the run folder a previous benchmark stage left (kept with --keep), "
                             "instead of starting it afresh: its models' jobs are not run again")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="checkpoint, SCDRUGMAP_HOME and benchmark output (default: <path stem>-bench beside it)")
    parser.add_argument("--chunk-rows", type=int, default=10_000, help="rows per chunk of the check")
    parser.add_argument("--token-chunk", type=int, default=2048, help="cells per chunk of the tokenizer")
    parser.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: its own)")
    parser.add_argument("--vocab", type=Path, default=DEFAULT_VOCAB, help="folder with geneformer_v1/, geneformer_v2/")
    parser.add_argument("--json", type=Path, default=None, help="also write every stage's JSON here (a list)")
    parser.add_argument("--stage", choices=(*STAGES, "cache"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child(args)
        return

    stages = [s for s in args.stages.split(",") if s]
    if unknown := [s for s in stages if s not in STAGES]:
        raise SystemExit(f"--stages {','.join(unknown)}: choose from {', '.join(STAGES)}")
    run = _run_dir(args)
    run.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SCDRUGMAP_HOME": str(run / "home"), "SCDRUGMAP_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    existed = args.path.exists()
    if not existed and "simulate" not in stages:
        raise SystemExit(f"{args.path}: no such file; add simulate to --stages")
    print(json.dumps({"cells": args.cells, "genes": args.genes, "path": str(args.path), "run_dir": str(run),
                      "stages": stages, "cpu_count": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
                      "disk_free_gib": round(shutil.disk_usage(args.path.parent if args.path.parent.exists()
                                                              else "/").free / 2**30, 1)}), flush=True)
    models = [m for m in args.models.split(",") if m]
    results: list[dict] = []
    for name in STAGES:
        if name not in stages:
            continue
        if name == "benchmark":
            if not args.add_models:  # a fresh run: the runner would skip finished jobs
                shutil.rmtree(run / "run", ignore_errors=True)
            if "geneformer" in models:  # setup, reported on its own line
                _record(results, run_stage("cache", args, env), args.json)
            for model in models:  # one process per model, all into one run folder
                _record(results, run_stage(name, args, env, models=model), args.json)
            continue
        _record(results, run_stage(name, args, env), args.json)
    print()
    print(_table(results))
    missed = [r["stage"] for r in results if "stage_failed" in r or not r["under_3gb"]]
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
        if not existed and args.path.exists():
            args.path.unlink()
    if missed:
        raise SystemExit(f"stages failed or over {LIMIT_BYTES / 1e9:g} GB of peak resident memory: {', '.join(missed)}")


if __name__ == "__main__":
    main()
