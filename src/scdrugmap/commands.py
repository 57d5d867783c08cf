"""Bodies of the ``scdrugmap`` commands: they take plain values, call the library and draw the output."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from scdrugmap.errors import ConfigError, OutputError, SchemaError, describe_os_error, is_write_failure
from scdrugmap.startup import imports_settled

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console

#: A cell with fewer than this fraction of its expressed genes in a model's vocabulary is counted as barely
#: overlapping in the warning `embed` and `predict` print (its embedding rests on a minority of its genes).
LOW_OVERLAP = 0.5


def overlap_warning(model: str, overlap: np.ndarray) -> str:
    """Return one line: how many cells overlap ``model``'s vocabulary below `LOW_OVERLAP`, and the median."""
    low = int(np.count_nonzero(overlap < LOW_OVERLAP))  # NaN (no expressed gene) compares False
    expressed = overlap[~np.isnan(overlap)]
    median = f"{float(np.median(expressed)):.2f}" if expressed.size else "n/a"
    line = (f"{low} of {overlap.size} cells have less than {LOW_OVERLAP:.0%} of their expressed genes in {model}'s "
            f"vocabulary (median overlap {median}; per cell in obs['{model}_gene_overlap'])")
    silent = overlap.size - expressed.size
    if silent:
        line += f"; {silent} cells express no gene"
    return f"[yellow]{line}[/yellow]" if low else line


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a refused write under ``path`` (full disk, quota, permissions) into one `OutputError` naming it."""
    try:
        yield
    except OSError as err:
        if not is_write_failure(err):
            raise
        raise OutputError(describe_os_error(err, path)) from err


@contextmanager
def atomic_outputs(*paths: Path) -> Iterator[tuple[Path, ...]]:
    """Yield temporary paths beside ``paths``; move them into place together only when all were written.

    A failed write (a full disk, a crash) leaves none of the outputs and no temporary file behind, and
    becomes one `OutputError` naming the first path.
    """
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = []
    try:
        with writing(paths[0]):
            for path in paths:
                handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(handle)
                temporary.append(Path(name))
            yield tuple(temporary)
            for tmp, path in zip(temporary, paths, strict=True):
                os.replace(tmp, path)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)


def gate(data: Path, *, model: str | None = None, needs: str | None = None, layer: str | None = None,
         max_memory: str | None = None, in_memory: bool = True, scan: bool = True) -> Any:
    """Run the validation gate (`scdrugmap.data.gate.validate_input`) on a file before any command reads it."""
    from scdrugmap.data.gate import validate_input

    if needs is None:
        needs = "any"
        if model is not None:
            from scdrugmap.registry import input_kind

            needs = input_kind(model)
    return validate_input(data, needs=needs, layer=layer, max_memory=max_memory,  # type: ignore[arg-type]
                          in_memory=in_memory, scan=scan)


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
              strict: bool, console: Console, errors: Console, max_memory: str | None = None) -> bool:
    """Check one file and print its report; return False when it has errors."""
    gate(file, model=model, layer=layer, max_memory=max_memory, in_memory=False, scan=False)  # check reads values
    with imports_settled():
        import anndata  # noqa: F401 - read_h5ad's, imported here with the rest

        from scdrugmap.data.check import check_adata
        from scdrugmap.data.io import read_h5ad
        from scdrugmap.data.schema import ObsKeys

    needs = "any"
    if model is not None:
        from scdrugmap.registry import input_kind

        needs = input_kind(model)
    adata = read_h5ad(file, backed=True)  # the matrix is read in row chunks, never whole
    try:
        report = check_adata(adata, source=str(file), keys=ObsKeys(**keys), layer=layer,
                             needs=cast(Literal["counts", "nonnegative", "any"], needs),
                             n_folds=folds, split=cast(Literal["sample", "cell"], split), strict=strict)
    finally:
        adata.file.close()
    facts = report.facts
    console.print(f"[bold]{escape(str(file))}[/bold]")
    console.print(f"  shape        {facts['shape'][0]:,} cells x {facts['shape'][1]:,} genes")
    if "value_kind" in facts:
        console.print(f"  values       {facts['value_kind']} ({escape(facts.get('value_detail', ''))})")
    if "gene_id_type" in facts:
        mapped = facts.get("genes_mapped", {})
        console.print(f"  gene ids     {facts['gene_id_type']}; {mapped.get('mapped', 0):,} of "
                      f"{mapped.get('total', 0):,} map to known human genes")
    if "labels" in facts:
        console.print(f"  labels       {facts['labels']['sensitive']:,} sensitive, {facts['labels']['resistant']:,} "
                      "resistant")
    if "label_design" in facts:
        console.print(f"  label design {facts['label_design']}")
    for column, table in report.tables.items():  # aligned plain text: a rich Table took 25 ms per table here
        console.print(Text(f"cells per {column}", style="bold"))
        console.print(Text(_aligned_counts(column, table.head(40))), soft_wrap=True)
        if len(table) > 40:
            console.print(f"... {len(table) - 40} more")
    for problem in report.problems:
        colour = "red" if problem.severity == "error" else "yellow"
        errors.print(f"[{colour}]{escape(f'{file}: {problem}')}[/{colour}]", highlight=False, soft_wrap=True)
    return report.ok


def _aligned_counts(column: str, table: Any) -> str:
    """Return the cells, sensitive and resistant counts per value of ``column`` as aligned text lines."""
    names = [column, "cells", "sensitive", "resistant"]
    rows = [names, *([str(value), f"{row.cells:,}", f"{row.sensitive:,}", f"{row.resistant:,}"]
                     for value, row in zip(table.index, table.itertuples(), strict=True))]
    widths = [max(len(row[index]) for row in rows) for index in range(len(names))]
    return "\n".join("  ".join(text.ljust(width) if index == 0 else text.rjust(width)
                                for index, (text, width) in enumerate(zip(row, widths, strict=True))).rstrip()
                      for row in rows)


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


def show_models(console: Console) -> None:
    from scdrugmap.registry import list_models

    view = Table(title="models (sizes of the default published variant)")
    for name in ("name", "family", "parameters", "embedding dim", "input", "LoRA targets", "weights"):
        view.add_column(name)
    for card in list_models():
        view.add_row(card.name, card.family, "-" if card.parameters is None else f"{card.parameters / 1e6:,.1f} M",
                     "" if card.embedding_dim is None else str(card.embedding_dim), card.input_kind,
                     ",".join(card.lora_targets), card.weights_state)
    console.print(view)


def show_model_info(console: Console, name: str) -> None:
    from scdrugmap.registry import model_card

    card = model_card(name)
    console.print(f"[bold]{name}[/bold]: {card.summary}")
    if card.description:
        console.print(card.description)
    console.print(f"family {card.family}; input {card.input_kind}; LoRA targets {', '.join(card.lora_targets) or '-'}")
    defaults = ", ".join(f"{dtype} on {device}" for device, dtype in card.default_dtypes.items())
    console.print(f"dtype auto: {defaults}; bfloat16 {card.bfloat16}", soft_wrap=True)
    if card.variant:
        size = "" if card.parameters is None else f"{card.parameters:,} parameters, "
        console.print(f"default variant {card.variant}: {size}{card.embedding_dim}-d embeddings")
    for weights in card.weights:
        state = "cached" if weights.cached else "not cached"
        console.print(f"  weights {weights.variant}: {state} at {weights.cache_path} ({weights.homepage})")
        for filename, url in weights.files:
            console.print(f"    {filename} <- {url}")


def download_model(name: str, *, force: bool, quiet: bool, console: Console) -> Path:
    from scdrugmap.registry import download_weights

    if quiet:
        return download_weights(name, force=force)
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), console=console) as bars:
        tasks: dict[str, Any] = {}

        def update(filename: str, done: int, total: int | None) -> None:
            if filename not in tasks:
                tasks[filename] = bars.add_task(filename, total=total)
            bars.update(tasks[filename], completed=done, total=total)

        return download_weights(name, force=force, progress=update)


def run_embed(data: Path, *, model: str, weights: Path | None, out: Path | None, layer: str | None,
              batch_size: int | None, device: str = "auto", dtype: str = "auto", executor: str = "local",
              ray_address: str | None = None,
              shard_cells: int = 20_000, cpus: float = 1.0, gpus: float = 0.0, quiet: bool, console: Console,
              max_memory: str | None = None) -> Path:
    """Embed ``data`` here or in shards on a Ray cluster; add ``obsm['X_<model>']`` to a copy, or save a .npy."""
    from scdrugmap import tl
    from scdrugmap.data.io import add_obsm_atomic, read_h5ad

    if executor not in {"local", "ray"}:
        msg = f"--executor {executor!r} is not available; choose from local, ray."
        raise ConfigError(msg)
    gate(data, model=model, layer=layer, max_memory=max_memory, in_memory=executor == "local")
    key = tl.embedding_key(model)
    with progress_bar(console, quiet=quiet) as update:
        report = None if update is None else (lambda d, t: update("embed", d, t, model))
        if executor == "ray":
            embeddings, facts, overlap = tl.embed_file(data, model, weights=weights, layer=layer,
                                                       batch_size=batch_size, device=device, dtype=dtype,  # type: ignore[arg-type]
                                                       ray_address=ray_address, shard_cells=shard_cells, cpus=cpus,
                                                       gpus=gpus, progress=report)
        else:
            adata = read_h5ad(data)
            tl.embed(adata, model, weights=weights, layer=layer, batch_size=batch_size, device=device,
                     dtype=dtype, progress=report)  # type: ignore[arg-type]  # checked by tl (ConfigError)
            embeddings, facts = adata.obsm[key], adata.uns["scdrugmap"][key]
            column = tl.overlap_key(model)
            overlap = adata.obs[column].to_numpy(dtype=np.float32) if column in adata.obs else None
    if overlap is not None:
        console.print(overlap_warning(model, overlap), soft_wrap=True)
    target = out or data
    if target.suffix == ".npy":
        with atomic_outputs(target) as (tmp,), open(tmp, "wb") as handle:
            np.save(handle, embeddings, allow_pickle=False)
        return target
    with writing(target):
        return add_obsm_atomic(data, target, key, embeddings, facts=facts,
                               obs_columns=None if overlap is None else {tl.overlap_key(model): overlap})


def run_train(data: Path, *, model: str, out: Path, strategy: str, head: str, weights: Path | None, label_key: str,
              sample_key: str, layer: str | None, seed: int, device: str = "auto", max_memory: str | None = None) -> Path:
    from scdrugmap import tl
    from scdrugmap.data.io import read_h5ad

    if strategy not in {"frozen", "lora"} or head not in {"mlp", "logistic"}:
        msg = f"--strategy {strategy} --head {head}: choose frozen or lora, and mlp or logistic."
        raise ConfigError(msg)
    gate(data, model=model, layer=layer, max_memory=max_memory)
    adata = read_h5ad(data)
    if label_key not in adata.obs:
        msg = f"{data}: obs has no {label_key!r} column; name the label column with --label-key."
        raise ConfigError(msg)
    trained = tl.train(adata, model, strategy=strategy, head=head, label_key=label_key,  # type: ignore[arg-type]
                       sample_key=sample_key, layer=layer, weights=weights, device=device, seed=seed)
    with writing(out):
        return trained.save(out)


def run_predict(data: Path, *, model: str, bundle: Path, weights: Path | None, out: Path | None, csv: Path | None,
                layer: str | None, threshold: float, console: Console, device: str = "auto",
                alpha: float | None = None, min_gene_overlap: float = 0.25, allow_value_kind_mismatch: bool = False,
                label_key: str = "response", max_memory: str | None = None) -> list[Path]:
    import logging

    with imports_settled():
        import anndata  # noqa: F401 - read_h5ad's, imported here with the rest

        from scdrugmap import tl
        from scdrugmap.data.io import read_h5ad, write_h5ad_changes
        from scdrugmap.readwrite import read_head

    head = read_head(bundle)
    if head.model != model:
        msg = f"{bundle}: the head was trained on {head.model} embeddings, not {model}. Use --model {head.model}."
        raise ConfigError(msg)
    # the file's structure and size here; its values once, by tl.predict's gate, after the read
    gate(data, model=model, layer=layer, max_memory=max_memory, scan=False)
    adata = read_h5ad(data)
    logger = logging.getLogger("scdrugmap.tl")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its warnings are printed below, once, with the summary
    try:
        tl.predict(adata, head, weights=weights, layer=layer, threshold=threshold, alpha=alpha,
                   min_gene_overlap=min_gene_overlap, allow_value_kind_mismatch=allow_value_kind_mismatch,
                   device=device)
    except SchemaError as err:  # name the file, not "the data" or "adata"
        message = str(err)
        message = f"{data}:{message.removeprefix('adata:')}" if message.startswith("adata:") else message
        raise SchemaError(message.replace("the data:", f"{data}:", 1)) from err
    finally:
        logger.setLevel(level)
    key = tl.prediction_key(model)
    facts = adata.uns["scdrugmap"][key]
    facts["head"] = str(bundle)
    for warning in facts.get("warnings", []):
        console.print(f"[yellow]{escape(str(warning))}[/yellow]", soft_wrap=True)
    summary = tl.prediction_summary(adata, key, label_key=label_key)
    if summary["n_missing"]:
        console.print(f"[yellow]{summary['n_missing']} of {adata.n_obs} cells could not be read by {model} (too few "
                      "of their genes are in its vocabulary); their prediction is empty.[/yellow]")
    columns = [tl.probability_column(key), f"{key}_prob_raw", tl.label_column(key), f"{key}_set", f"{key}_ood",
               f"{key}_ood_score", f"{key}_ood_reason"]
    overlap = tl.overlap_key(model)
    if overlap in adata.obs:
        console.print(overlap_warning(model, adata.obs[overlap].to_numpy(dtype=np.float32)), soft_wrap=True)
        columns.append(overlap)
    out = out or data.with_name(f"{data.stem}.predicted.h5ad")
    csv = csv or out.with_suffix(".csv")
    table = adata.obs[columns].rename(columns={overlap: "gene_overlap"}).rename_axis("cell")
    with atomic_outputs(out, csv) as (tmp_out, tmp_csv):  # both outputs, or neither
        write_h5ad_changes(adata, data, tmp_out, changed=("obs", "uns"))  # the rest copied as stored
        table.to_csv(tmp_csv)
    print_prediction_summary(console, summary, alpha=facts.get("alpha"), gene_overlap=facts.get("gene_overlap"))
    return [out, csv]


def print_prediction_summary(console: Console, summary: dict[str, Any], *, alpha: float | None,
                             gene_overlap: float | None) -> None:
    """Print what a lab reads after `predict`: calls, sets, flags and, with labels, scores (unit: cells)."""
    n = summary["n_cells"]
    console.print(f"{n} cells: {summary['n_sensitive']} sensitive, {summary['n_resistant']} resistant "
                  f"(calibrated probability at the threshold)")
    level = "" if alpha is None else f" at {1 - float(alpha):.0%} confidence per class"
    console.print(f"prediction sets{level}: {summary['n_uncertain']} uncertain (both classes), "
                  f"{summary['n_empty_set']} none (neither)")
    console.print(f"out of distribution: {summary['n_ood']} of {n} cells (far from the training cells in embedding "
                  "space, or few known genes)")
    if gene_overlap is not None:
        console.print(f"gene overlap with the head: {gene_overlap:.0%} of its genes (harmonised ids)")
    scored = summary.get("scored")
    if scored:
        auroc = scored.get("auroc", float("nan"))
        f1 = scored.get("f1", float("nan"))
        console.print(f"against the observed labels (N = {scored['n']} cells): F1 {f1:.3f}, AUROC {auroc:.3f}")
        measured = summary.get("coverage")
        if measured:
            console.print(f"set coverage: {measured['coverage']:.3f} overall, {measured['coverage_sensitive']:.3f} "
                          f"sensitive, {measured['coverage_resistant']:.3f} resistant; mean set size "
                          f"{measured['mean_set_size']:.2f}")


def run_benchmark_command(config_path: Path | None, overrides: dict[str, Any], keys: dict[str, str], *, quiet: bool,
                          console: Console, progress_console: Console, max_memory: str | None = None) -> None:
    """Run the benchmark; a run that fails before its first job is written leaves no run folder behind."""
    from scdrugmap.evaluate.grid import BenchmarkConfig
    from scdrugmap.evaluate.runner import run_benchmark, summary_table
    from scdrugmap.registry import input_kind

    config = BenchmarkConfig.resolve(config_path, overrides, keys)
    config.validate()
    if config.data != "demo":
        kinds = {input_kind(model) for model in config.models}
        needs = next((kind for kind in ("counts", "nonnegative") if kind in kinds), "any")
        gate(Path(config.data), needs=needs, layer=config.layer, max_memory=max_memory)
    run_dir = Path(config.out)
    existed = run_dir.exists()
    try:
        with writing(run_dir), progress_bar(progress_console, quiet=quiet) as update:
            results = run_benchmark(config, progress=update)
    except BaseException:
        if not existed:
            remove_unstarted_run(run_dir)
        raise
    print_summary(console, summary_table(results), results, Path(config.out))


def remove_unstarted_run(run_dir: Path) -> None:
    """Delete a run folder this command created when no job result was written into it."""
    from scdrugmap.evaluate.store import ResultStore

    if run_dir.is_dir() and not ResultStore(run_dir).has_jobs():
        shutil.rmtree(run_dir, ignore_errors=True)


def _setting(strategy: str, head: str) -> str:
    return strategy if head == "mlp" else f"{strategy}/{head}"


def _split(row: Any) -> str:
    """Return the split policy of a summary row ("-" for the external scenario: train and test are two files)."""
    return "-" if row["scenario"] == "external" else row["split"]


def _versus(comparisons: Any, row: Any, versus: str) -> str:
    """Return "+0.21 p=0.002 yes" for one row of the summary (mean paired AUROC difference), "—" without one."""
    match = comparisons[(comparisons["versus"] == versus) & (comparisons["model"] == row["model"])
                        & (comparisons["strategy"] == row["strategy"]) & (comparisons["head"] == row["head"])
                        & (comparisons["scenario"] == row["scenario"]) & (comparisons["category"] == row["category"])
                        & (comparisons["split"] == row["split"])] if len(comparisons) else comparisons
    if not len(match) or not match["n"].iloc[0]:
        return "—"
    test = match.iloc[0]
    answer = "[green]yes[/green]" if test["beats"] else "no"
    return f"{test['mean']:+.2f} p={test['p_value']:.2g} {answer}"


def print_summary(console: Console, table: Any, results: Any, run_dir: Path) -> None:
    """Print the run's summary: sample-level and cell-level results, paired tests, and findings.

    Where labels are per sample (every sample's cells share one label), the sample-level table comes
    first and says why. The cell-level table gives mean (sd) AUROC and F1 over the folds where each
    is defined, and whether the model beats the majority reference and the best baseline (paired
    folds: mean AUROC difference and one-sided sign-flip p-value; the report adds the bootstrap
    intervals); with ``--permutations`` also the empirical p-value against the label-permutation null.
    """
    from scdrugmap.evaluate.grid import category_labels
    from scdrugmap.evaluate.stats import (
        CATEGORY_COLUMNS,
        baseline_models,
        compare_models,
        confounder_auroc,
        findings,
        label_design,
        permutation_pvalues,
        sample_level_auroc,
    )
    from scdrugmap.evaluate.store import read_run, results_file

    if results.empty:
        console.print(f"0 jobs; nothing stored in {run_dir}.")
        return
    folder = read_run(run_dir)
    seed = int(folder.config.get("seed", 0) or 0)
    names = category_labels(results)
    design = label_design(folder.cells)
    samples = sample_level_auroc(folder.predictions, folder.cells, results, by=CATEGORY_COLUMNS, seed=seed)
    baselines = baseline_models(list(dict.fromkeys(results["model"].astype(str))), folder.models)
    comparisons = compare_models(results, baselines=baselines, by=CATEGORY_COLUMNS, seed=seed)
    null = permutation_pvalues(results, folder.permutations, by=CATEGORY_COLUMNS)
    settings = len(table[["strategy", "head"]].drop_duplicates()) > 1 if len(table) else False

    def start(title: str, names_: list[str], right: set[str]) -> Table:
        view = Table(title=title, title_justify="left", padding=(0, 1))
        for name in names_:
            view.add_column(name, justify="right" if name in right else "left", no_wrap=name != "category")
        return view

    first = ["model", *(["setting"] if settings else []), "scenario", "category", "split"]
    sample_view = start("sample level: AUROC of each sample's mean probability (pairs compared within their fold) "
                        "with bootstrap 95% CI", [*first, "AUROC", "95% CI", "samples", "pairs"],
                        {"AUROC", "samples", "pairs"})
    for _, row in samples.iterrows():
        scored = np.isfinite(row["auroc"])
        sample_view.add_row(row["model"], *([_setting(row["strategy"], row["head"])] if settings else []),
                            row["scenario"], names.get((row["scenario"], row["category"]), row["category"]), _split(row),
                            f"{row['auroc']:.3f}" if scored else "n/a",
                            f"{row['ci_low']:.2f}-{row['ci_high']:.2f}" if scored else row["reason"],
                            str(int(row["n_samples"])), str(int(row["n_pairs"])))
    permuted = len(null) > 0
    cell_view = start("cell level: mean ± sd over the folds where a metric is defined; vs majority / best baseline: "
                      "mean AUROC difference over paired folds, one-sided p, beats it?",
                      [*first, "AUROC", "F1", "folds", "vs majority", "vs best baseline",
                       *(["perm. p"] if permuted else [])], {"AUROC", "F1", "folds", "perm. p"})
    def mean_sd(row: Any, metric: str) -> str:
        if not row[f"{metric}_n"]:
            return "n/a"
        return f"{row[f'{metric}_mean']:.3f}" + (f"±{row[f'{metric}_sd']:.2f}" if row[f"{metric}_n"] > 1 else "")

    for _, row in table.iterrows():
        cells = [row["model"], *([_setting(row["strategy"], row["head"])] if settings else []), row["scenario"],
                 names.get((row["scenario"], row["category"]), row["category"]), _split(row),
                 mean_sd(row, "auroc"), mean_sd(row, "f1"),
                 f"{int(row['n_folds'])}/{int(row['n_folds'] + row['n_not_scored'])}",
                 _versus(comparisons, row, "reference"), _versus(comparisons, row, "best baseline")]
        if permuted:
            match = null[(null["model"] == row["model"]) & (null["strategy"] == row["strategy"])
                         & (null["head"] == row["head"]) & (null["scenario"] == row["scenario"])
                         & (null["category"] == row["category"]) & (null["split"] == row["split"])]
            cells.append(f"{match['p_value'].iloc[0]:.3g} ({int(match['n_permutations'].iloc[0])})" if len(match)
                         else "—")
        cell_view.add_row(*cells)

    if design == "per-sample":
        console.print("Labels are per sample (every sample's cells share one label): a sample is the unit whose "
                      "response is known, so sample-level results come first.", soft_wrap=True)
        console.print(sample_view)
        console.print(cell_view)
    else:
        console.print(cell_view)
        if len(samples):
            console.print(sample_view)
    console.print("[bold]Findings[/bold]")
    confounders = confounder_auroc(folder.predictions, folder.cells, results)
    for number, sentence in enumerate(findings(results, comparisons=comparisons, samples=samples,
                                               baselines=baselines, confounders=confounders), start=1):
        console.print(f"{number}. {sentence}", soft_wrap=True)
    cell_rows = results[results["level"] == "cell"] if "level" in results else results
    counts = cell_rows["status"].value_counts().to_dict() if "status" in cell_rows else {}
    console.print(f"{len(cell_rows)} jobs ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
                  f"results in {results_file(run_dir)}; `scdrugmap report {run_dir}` draws the figures.",
                  soft_wrap=True)


def run_biomarkers(data: Path, *, model: str, out: Path | None, head: Path | None, run: Path | None, label_key: str,
                   sample_key: str | None, cell_type_key: str | None, gene_sets: Path | None,
                   comparisons: list[str] | None, top_k: int, cells: int, genes: int, bootstrap: int,
                   layer: str | None, weights: Path | None, seed: int, device: str, quiet: bool, console: Console,
                   progress_console: Console, max_memory: str | None = None, steps: int | None = None) -> list[Path]:
    """Find biomarkers in ``data`` (observed labels, a head's predictions or a run's), write them, print the top genes.

    ``out`` defaults, with ``run``, to the run's biomarker folder (`scdrugmap.evaluate.store.biomarkers_dir`),
    where ``scdrugmap report RUN`` finds it.
    """
    from scdrugmap import tl
    from scdrugmap.data.io import read_h5ad
    from scdrugmap.evaluate.store import biomarkers_dir
    from scdrugmap.readwrite import read_head

    if out is None:
        if run is None:
            msg = "--out is needed (the folder for the tables and figures); with --run it defaults to RUN/biomarkers."
            raise ConfigError(msg)
        out = biomarkers_dir(run)

    trained = None
    if head is not None:
        trained = read_head(head)
        if trained.model != model:
            msg = f"{head}: the head was trained on {trained.model} embeddings, not {model}. Use --model {trained.model}."
            raise ConfigError(msg)
    if gene_sets is not None and not gene_sets.is_file():
        msg = f"--gene-sets {gene_sets}: no such file; give a GMT file (one set per line: name, description, genes)."
        raise ConfigError(msg)
    gate(data, model=model if trained is not None else None, layer=layer, max_memory=max_memory)
    adata = read_h5ad(data)
    with progress_bar(progress_console, quiet=quiet) as update:
        try:
            found = tl.biomarkers(adata, model, head=trained, run=run, label_key=label_key, sample_key=sample_key,
                                  cell_type_key=cell_type_key, gene_sets=gene_sets,
                                  comparisons=comparisons,  # type: ignore[arg-type]
                                  top_k=top_k, max_cells=cells, max_genes=genes, n_steps=steps,
                                  n_bootstrap=bootstrap, layer=layer,
                                  weights=weights, device=device, seed=seed, progress=update)
        except SchemaError as err:  # name the file, not "the data"
            raise SchemaError(f"{data}: {err}") from err
    with writing(out):
        paths = found.write(out)
    print_biomarkers(console, found, top=min(top_k, 10))
    return paths


def print_biomarkers(console: Console, found: Any, *, top: int = 10) -> None:
    """Print, per comparison, the top genes higher and lower in resistant cells, and the caveats."""
    facts = found.facts
    for name in facts["comparisons"]:
        rows = found.table[found.table["comparison"] == name]
        counts = facts["groups"][name]
        tests = ", ".join(facts["tests"].get(name, []))
        for direction, word in (("up", "higher"), ("down", "lower")):
            view = Table(title=escape(f"{name} labels: top genes {word} in resistant cells ({tests}; "
                                      f"{counts['cells']['resistant']:,} resistant vs {counts['cells']['sensitive']:,} "
                                      f"sensitive cells, {counts['samples']['resistant']} vs "
                                      f"{counts['samples']['sensitive']} samples)"), title_justify="left")
            for column in ("gene", "log2fc", "p", "q", "attribution", "deletion", "stability"):
                view.add_column(column, justify="left" if column == "gene" else "right", no_wrap=True)
            best = rows.dropna(subset=["pvalue"]).drop_duplicates("gene").set_index("gene")
            for gene in found.top_genes(name, direction=direction, k=top):
                row = best.loc[gene]
                view.add_row(escape(gene), _number(row["log2fc"], "+.2f"), _number(row["pvalue"], ".1e"),
                             _number(row["qvalue"], ".1e"), _number(row["attribution_abs_mean"], ".3f"),
                             _number(row["deletion_delta"], "+.3f"), _number(row["stability"], ".2f"))
            console.print(view)
    about = facts.get("attribution", {})
    refit = facts.get("fold_models", {})
    if refit.get("n_folds"):
        console.print(f"fold models: {refit['n_folds']} retrained from the run; largest difference from its saved "
                      f"predictions {refit['max_difference']:.2g} (allowed {refit['tolerance']:g})", soft_wrap=True)
    if about.get("method"):
        who = f" by {about['model']}" if about.get("model") else ""
        console.print(escape(f"attribution: {about['method']} of {about['explains']} on {about['n_cells']} cells{who} "
                             "(mean |attribution| per cell); deletion: change in P(sensitive) when the gene is zeroed"),
                      soft_wrap=True)
        if about.get("largest_change") is not None:
            console.print(f"completeness: a cell's attributions miss P(cell) - P(baseline) by up to "
                          f"{about['completeness_error_max']:.2g} (largest change {about['largest_change']:.2g}; "
                          "--steps raises the accuracy)", soft_wrap=True)
    elif about.get("reason") or about.get("note"):
        console.print(escape(f"attribution: {about.get('reason') or about.get('note')}"), soft_wrap=True)
    for caveat in facts.get("caveats", []):
        console.print(f"[yellow]caveat: {escape(caveat)}[/yellow]", soft_wrap=True)


def _number(value: Any, spec: str) -> str:
    return "" if value is None or value != value else format(float(value), spec)
