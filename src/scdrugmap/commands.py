"""Bodies of the ``scdrugmap`` commands: they take plain values, call the library and draw the output."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.table import Table

from scdrugmap.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console

#: A cell with fewer than this fraction of its expressed genes in a model's vocabulary is counted as barely
#: overlapping in the warning `embed` and `predict` print (its embedding rests on a minority of its genes).
LOW_OVERLAP = 0.5


def overlap_column(model: str) -> str:
    """Return the obs column that holds each cell's gene overlap with ``model``'s vocabulary."""
    return f"{model}_gene_overlap"


def overlap_warning(model: str, overlap: np.ndarray) -> str:
    """Return one line: how many cells overlap ``model``'s vocabulary below `LOW_OVERLAP`, and the median."""
    low = int(np.count_nonzero(overlap < LOW_OVERLAP))  # NaN (no expressed gene) compares False
    expressed = overlap[~np.isnan(overlap)]
    median = f"{float(np.median(expressed)):.2f}" if expressed.size else "n/a"
    line = (f"{low} of {overlap.size} cells have less than {LOW_OVERLAP:.0%} of their expressed genes in {model}'s "
            f"vocabulary (median overlap {median}; per cell in obs['{overlap_column(model)}'])")
    silent = overlap.size - expressed.size
    if silent:
        line += f"; {silent} cells express no gene"
    return f"[yellow]{line}[/yellow]" if low else line


@contextmanager
def progress_bar(console: Console, *, quiet: bool) -> Iterator[Any]:
    """Yield a callback ``(stage, done, total, detail)`` drawing rich bars (nothing when quiet)."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bars:
        def update(stage: str, done: int, total: int, detail: str) -> None:
            name = f"{stage} {detail}".strip() if stage == "embed" else stage
            if name not in tasks:
                tasks[name] = bars.add_task(name, total=total)
            bars.update(tasks[name], completed=done, total=total)

        yield update


def run_check(file: Path, *, keys: dict[str, str], layer: str | None, model: str | None, folds: int, split: str,
              strict: bool, console: Console, errors: Console) -> bool:
    """Check one file and print its report; return False when it has errors."""
    from scdrugmap.data.check import check_adata
    from scdrugmap.data.io import read_h5ad
    from scdrugmap.data.schema import ObsKeys

    needs = "any"
    if model is not None:
        from scdrugmap.models.base import get_encoder_class

        needs = get_encoder_class(model).input_kind
    adata = read_h5ad(file, backed=True)  # the matrix is read in row chunks, never whole
    try:
        report = check_adata(adata, source=str(file), keys=ObsKeys(**keys), layer=layer, needs=needs,
                             n_folds=folds, split=split, strict=strict)
    finally:
        adata.file.close()
    facts = report.facts
    console.print(f"[bold]{file}[/bold]")
    console.print(f"  shape        {facts['shape'][0]:,} cells x {facts['shape'][1]:,} genes")
    if "value_kind" in facts:
        console.print(f"  values       {facts['value_kind']} ({facts.get('value_detail', '')})")
    if "gene_id_type" in facts:
        mapped = facts.get("genes_mapped", {})
        console.print(f"  gene ids     {facts['gene_id_type']}; {mapped.get('mapped', 0):,} of "
                      f"{mapped.get('total', 0):,} map to known human genes")
    if "labels" in facts:
        console.print(f"  labels       {facts['labels']['sensitive']:,} sensitive, {facts['labels']['resistant']:,} "
                      "resistant")
    if "label_design" in facts:
        console.print(f"  label design {facts['label_design']}")
    for column, table in report.tables.items():
        view = Table(title=f"cells per {column}", title_justify="left")
        for name in (column, "cells", "sensitive", "resistant"):
            view.add_column(name, justify="left" if name == column else "right")
        for value, row in table.head(40).iterrows():
            view.add_row(str(value), f"{row['cells']:,}", f"{row['sensitive']:,}", f"{row['resistant']:,}")
        if len(table) > 40:
            view.add_row(f"... {len(table) - 40} more", "", "", "")
        console.print(view)
    for problem in report.problems:
        colour = "red" if problem.severity == "error" else "yellow"
        errors.print(f"[{colour}]{file}: {problem}[/{colour}]", highlight=False, soft_wrap=True)
    return report.ok


def show_catalog(console: Console, **filters: str | None) -> None:
    from scdrugmap.data.catalog import filter_catalog

    table = filter_catalog(**filters)
    view = Table(title=f"{len(table)} data sets")
    for name in ("dataset_id", "collection", "study", "tissue", "cancer_type", "therapy", "regimen", "n_samples"):
        view.add_column(name)
    for _, row in table.iterrows():
        view.add_row(*(str(row[c]) for c in ("dataset_id", "collection", "study", "tissue", "cancer_type", "therapy",
                                              "regimen", "n_samples")))
    console.print(view)


def show_dataset(console: Console, dataset_id: str) -> None:
    from scdrugmap.data.catalog import get_dataset, load_category_counts

    row = get_dataset(dataset_id)
    view = Table(show_header=False, title=f"{row['dataset_id']}: {row['subgroup']}", title_justify="left")
    view.add_column("field", style="bold")
    view.add_column("value")
    for name, value in row.items():
        view.add_row(str(name), str(value))
    counts = load_category_counts()
    holding = counts[counts["dataset_ids"].astype(str).str.split().apply(lambda ids: row["dataset_id"] in ids)]
    for _, count in holding.iterrows():
        view.add_row(f"cells in {count['category']}", f"{count['value']}: {count['n_cells']:,} "
                     f"({count['n_sensitive']:,} sensitive / {count['n_resistant']:,} resistant)")
    console.print(view)


def _weights_state(cls: Any) -> str:
    from scdrugmap.models.weights import is_cached

    sources = getattr(cls, "weights_sources", {}) or {}
    if not sources:
        return "built in"
    default_path = getattr(cls, "_default_path", None)
    if default_path is not None and default_path(next(iter(sources))) is not None:
        return "installed"  # shipped by a pip package (all-MiniLM-L6-v2)
    if any(is_cached(source) for source in sources.values()):
        return "cached"
    return "downloadable"


def show_models(console: Console) -> None:
    from scdrugmap.models.base import PUBLISHED_SIZES, get_encoder_class, registry

    view = Table(title="models (sizes of the default published variant)")
    for name in ("name", "family", "parameters", "embedding dim", "input", "LoRA targets", "weights"):
        view.add_column(name)
    for name in sorted(registry()):
        try:
            cls = get_encoder_class(name)
        except ImportError as err:
            view.add_row(name, "?", "", "", "", "", f"unavailable ({err.name} missing)")
            continue
        parameters, width, _ = PUBLISHED_SIZES.get(name, (None, None, ""))
        view.add_row(name, cls.family, "-" if parameters is None else f"{parameters / 1e6:,.1f} M",
                     "" if width is None else str(width), cls.input_kind, ",".join(cls.lora_targets),
                     _weights_state(cls))
    console.print(view)


def show_model_info(console: Console, name: str) -> None:
    from scdrugmap.models.base import get_encoder_class
    from scdrugmap.models.weights import cache_path, is_cached

    cls = get_encoder_class(name)
    console.print(f"[bold]{name}[/bold]: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    module_doc = (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip()
    if module_doc:
        console.print(module_doc)
    console.print(f"family {cls.family}; input {cls.input_kind}; LoRA targets {', '.join(cls.lora_targets) or '-'}")
    from scdrugmap.models.base import PUBLISHED_SIZES

    if name.lower() in PUBLISHED_SIZES:
        parameters, width, variant = PUBLISHED_SIZES[name.lower()]
        size = "" if parameters is None else f"{parameters:,} parameters, "
        console.print(f"default variant {variant}: {size}{width}-d embeddings")
    for variant, source in (getattr(cls, "weights_sources", {}) or {}).items():
        state = "cached" if is_cached(source) else "not cached"
        console.print(f"  weights {variant}: {state} at {cache_path(source)} ({source.homepage})")
        for remote in source.files:
            console.print(f"    {remote.filename} <- {remote.resolved_url()}")


def download_model(name: str, *, force: bool, quiet: bool, console: Console) -> Path:
    from scdrugmap.models.base import get_encoder_class
    from scdrugmap.models.weights import download

    model, _, variant = name.partition(":")
    sources = getattr(get_encoder_class(model), "weights_sources", {}) or {}
    if not sources:
        msg = f"{model} has no weights to download (it is computed from the data)."
        raise ConfigError(msg)
    if variant and variant not in sources:
        msg = f"{model} has no variant {variant!r}; variants: {', '.join(sources)}."
        raise ConfigError(msg)
    source = sources[variant] if variant else next(iter(sources.values()))
    if quiet:
        return download(source, force=force)
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), console=console) as bars:
        tasks: dict[str, Any] = {}

        def update(filename: str, done: int, total: int | None) -> None:
            if filename not in tasks:
                tasks[filename] = bars.add_task(filename, total=total)
            bars.update(tasks[filename], completed=done, total=total)

        return download(source, force=force, progress=update)


def run_embed(data: Path, *, model: str, weights: Path | None, out: Path | None, layer: str | None,
              batch_size: int | None, device: str = "auto", executor: str = "local", ray_address: str | None = None,
              shard_cells: int = 20_000, cpus: float = 1.0, gpus: float = 0.0, quiet: bool, console: Console) -> Path:
    """Embed ``data`` here or in shards on a Ray cluster; add ``obsm['X_<model>']`` to a copy, or save a .npy."""
    from scdrugmap.data.io import add_obsm_atomic, read_h5ad
    from scdrugmap.models.base import load_encoder

    if executor not in {"local", "ray"}:
        msg = f"--executor {executor!r} is not available; choose from local, ray."
        raise ConfigError(msg)
    with progress_bar(console, quiet=quiet) as update:
        report = None if update is None else (lambda d, t: update("embed", d, t, model))
        if executor == "ray":
            from scdrugmap import cluster
            from scdrugmap.models.sharded import EncoderSpec, embed_sharded

            cluster.connect(ray_address)
            backed = read_h5ad(data, backed=True)
            n_obs = backed.n_obs
            backed.file.close()
            result = embed_sharded(EncoderSpec(model, None if weights is None else str(weights), {}, device),
                                   data.resolve(), n_obs=n_obs, layer=layer, batch_size=batch_size,
                                   shard_cells=shard_cells, resources=cluster.Resources(cpus=cpus, gpus=gpus),
                                   progress=report)
            embeddings, checkpoint = result.embeddings, result.checkpoint_sha256
            overlap = result.gene_overlap
        else:
            adata = read_h5ad(data)
            encoder = load_encoder(model, weights, device=device)
            embeddings = encoder.embed(adata, layer=layer, batch_size=batch_size, progress=report)
            checkpoint, overlap = encoder.checkpoint_sha256, encoder.gene_overlap_
    if overlap is not None:
        console.print(overlap_warning(model, overlap), soft_wrap=True)
    target = out or data
    if target.suffix == ".npy":
        tmp = target.with_name(target.name + ".tmp.npy")
        np.save(tmp, embeddings, allow_pickle=False)
        os.replace(tmp, target)
        return target
    key = f"X_{model}"
    return add_obsm_atomic(data, target, key, embeddings,
                           facts={"model": model, "checkpoint_sha256": checkpoint or "", "layer": layer or "X"},
                           obs_columns=None if overlap is None else {overlap_column(model): overlap})


def run_train(data: Path, *, model: str, out: Path, strategy: str, head: str, weights: Path | None, label_key: str,
              sample_key: str, layer: str | None, seed: int, device: str = "auto") -> Path:
    from scdrugmap.data.io import read_h5ad
    from scdrugmap.data.schema import encode_labels
    from scdrugmap.models.base import load_encoder
    from scdrugmap.train.heads import HeadConfig
    from scdrugmap.train.lora import LoRAConfig
    from scdrugmap.train.predict import train_bundle

    if strategy not in {"frozen", "lora"} or head not in {"mlp", "logistic"}:
        msg = f"--strategy {strategy} --head {head}: choose frozen or lora, and mlp or logistic."
        raise ConfigError(msg)
    adata = read_h5ad(data)
    if label_key not in adata.obs:
        msg = f"{data}: obs has no {label_key!r} column; name the label column with --label-key."
        raise ConfigError(msg)
    labels = encode_labels(adata.obs[label_key].to_numpy(), column=label_key, source=str(data))
    groups = adata.obs[sample_key].astype(str).to_numpy() if sample_key in adata.obs else None
    encoder = load_encoder(model, weights, device=device)
    encoder.check_input(adata, layer=layer)
    return train_bundle(encoder, adata, labels, groups, out, strategy=strategy, head=head, layer=layer,
                        head_config=HeadConfig(seed=seed), lora_config=LoRAConfig(seed=seed))


def run_predict(data: Path, *, model: str, bundle: Path, weights: Path | None, out: Path | None, csv: Path | None,
                layer: str | None, threshold: float, console: Console, device: str = "auto") -> list[Path]:
    import numpy as np
    import pandas as pd

    from scdrugmap.data.io import read_h5ad, write_h5ad_atomic
    from scdrugmap.models.base import TorchEncoder, load_encoder
    from scdrugmap.train.predict import predict_cells

    adata = read_h5ad(data)
    encoder = load_encoder(model, weights, device=device)
    encoder.check_input(adata, layer=layer)
    encoder.gene_overlap_ = None
    probability = predict_cells(encoder, adata, bundle, layer=layer)
    overlap = encoder.gene_overlap_
    if overlap is None and isinstance(encoder, TorchEncoder):  # a LoRA head tokenizes without `embed`
        overlap = encoder.measure_gene_overlap(adata, layer=layer)
    missing = int(np.isnan(probability).sum())
    if missing:
        console.print(f"[yellow]{missing} of {adata.n_obs} cells could not be read by {model} (too few of their genes "
                      "are in its vocabulary); their prediction is empty.[/yellow]")
    if overlap is not None:
        console.print(overlap_warning(model, overlap), soft_wrap=True)
    key = f"scdrugmap_{model}"
    adata.obs[f"{key}_prob_sensitive"] = probability
    adata.obs[f"{key}_prediction"] = pd.Categorical(
        np.where(np.isnan(probability), None, np.where(probability >= threshold, "sensitive", "resistant")))
    columns = [f"{key}_prob_sensitive", f"{key}_prediction"]
    if overlap is not None:
        adata.obs[overlap_column(model)] = overlap
        columns.append(overlap_column(model))
    adata.uns.setdefault("scdrugmap", {})[key] = {"model": model, "head": str(bundle), "threshold": threshold,
                                                   "checkpoint_sha256": encoder.checkpoint_sha256 or ""}
    out = out or data.with_name(f"{data.stem}.predicted.h5ad")
    csv = csv or out.with_suffix(".csv")
    write_h5ad_atomic(adata, out)
    table = adata.obs[columns].rename(columns={overlap_column(model): "gene_overlap"}).rename_axis("cell")
    tmp = csv.with_name(csv.name + ".tmp")
    table.to_csv(tmp)
    tmp.replace(csv)
    called = table[f"{key}_prediction"].value_counts().to_dict()
    console.print(f"{adata.n_obs} cells: {called.get('sensitive', 0)} sensitive, {called.get('resistant', 0)} resistant")
    return [out, csv]


def run_benchmark_command(config_path: Path | None, overrides: dict[str, Any], keys: dict[str, str], *, quiet: bool,
                          console: Console, progress_console: Console) -> None:
    from scdrugmap.evaluate.grid import BenchmarkConfig
    from scdrugmap.evaluate.runner import run_benchmark, summary_table

    config = BenchmarkConfig.resolve(config_path, overrides, keys)
    with progress_bar(progress_console, quiet=quiet) as update:
        results = run_benchmark(config, progress=update)
    print_summary(console, summary_table(results), results, Path(config.out))


def print_summary(console: Console, table: Any, results: Any, run_dir: Path) -> None:
    """Print mean (sd) F1 and AUROC per model, strategy, scenario, category and split."""
    from scdrugmap.evaluate.store import results_file

    view = Table(title="mean over scored folds (sd)", title_justify="left", padding=(0, 1))
    for name in ("model", "strategy", "scenario", "category", "split", "F1", "AUROC", "folds", "unscored"):
        view.add_column(name, justify="right" if name in {"F1", "AUROC", "folds", "unscored"} else "left",
                        no_wrap=True)
    for _, row in table.iterrows():
        strategy = row["strategy"] if row["head"] == "mlp" else f"{row['strategy']}/{row['head']}"
        view.add_row(row["model"], strategy, row["scenario"], row["category"], row["split"],
                     f"{row['f1_mean']:.3f}±{row['f1_sd']:.2f}", f"{row['auroc_mean']:.3f}±{row['auroc_sd']:.2f}",
                     str(int(row["n_folds"])), str(int(row["n_not_scored"])))
    console.print(view)
    counts = results["status"].value_counts().to_dict()
    console.print(f"{len(results)} jobs ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
                  f"results in {results_file(run_dir)}")
