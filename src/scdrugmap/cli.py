"""The ``scdrugmap`` command: thin commands whose bodies import heavy modules only when run.

Expected failures (`ScDrugMapError`) print one red line and exit 1; only bugs show a traceback.

Annotations here are evaluated when the module loads (no ``from __future__ import annotations``): typer
reads every command's signature on each run, and strings would be evaluated again each time (about 20 ms
of every command's start-up).
"""

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from scdrugmap.errors import ConfigError, ScDrugMapError

app = typer.Typer(help="Single-cell drug response prediction and benchmarking with foundation models.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
datasets_app = typer.Typer(help="The curated catalog, the demo simulator and data import.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry and official weights.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")

stdout = Console(width=None if sys.stdout.isatty() else 140)
stderr = Console(stderr=True)
STATE = {"quiet": False}


def _split_list(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


@app.callback()
def root(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
         quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Hide progress bars and info logs.")] = False,
         log_file: Annotated[Path | None, typer.Option(help="Also write the log to this file.")] = None) -> None:
    """Set up logging once: rich on stderr, -v for debug, --log-file for a copy."""
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handlers: list[logging.Handler] = [RichHandler(console=stderr, show_path=False, show_time=False)]
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(handler)
    logging.basicConfig(level=level, handlers=handlers, format="%(message)s", force=True)
    STATE["quiet"] = quiet or not stderr.is_terminal


# --- shared options ----------------------------------------------------------------------------------------

LabelKey = Annotated[str, typer.Option(help="obs column with sensitive/resistant (or 1/0) labels.")]
StudyKey = Annotated[str, typer.Option(help="obs column naming the study (e.g. GEO series).")]
SampleKey = Annotated[str, typer.Option(help="obs column naming the patient or sample (never split).")]
TissueKey = Annotated[str, typer.Option(help="obs column of the tissue.")]
CancerKey = Annotated[str, typer.Option(help="obs column of the cancer type.")]
TherapyKey = Annotated[str, typer.Option(help="obs column of the therapy.")]
RegimenKey = Annotated[str, typer.Option(help="obs column of the regimen.")]
Layer = Annotated[str | None, typer.Option(help="Expression layer to use instead of X (e.g. counts).")]
MaxMemory = Annotated[str | None, typer.Option(
    "--max-memory", envvar="SCDRUGMAP_MAX_MEMORY",
    help="Memory the data may need, e.g. 8G (default: 80% of the memory available now). Larger inputs are "
         "refused before they are read.")]
CellTypeKey = Annotated[str, typer.Option(help="obs column of the cell type (used when present: AUROC within each cell type).")]


def _obs_keys(label_key: str, study_key: str, sample_key: str, tissue_key: str, cancer_type_key: str,
              therapy_key: str, regimen_key: str, cell_type_key: str = "cell_type") -> dict[str, str]:
    return {"response": label_key, "study": study_key, "sample": sample_key, "tissue": tissue_key,
            "cancer_type": cancer_type_key, "therapy": therapy_key, "regimen": regimen_key,
            "cell_type": cell_type_key}


# --- check -------------------------------------------------------------------------------------------------

@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="The .h5ad file to check.")],
    label_key: LabelKey = "response", study_key: StudyKey = "study", sample_key: SampleKey = "sample",
    tissue_key: TissueKey = "tissue", cancer_type_key: CancerKey = "cancer_type", therapy_key: TherapyKey = "therapy",
    regimen_key: RegimenKey = "regimen", cell_type_key: CellTypeKey = "cell_type", layer: Layer = None,
    model: Annotated[str | None, typer.Option(help="Check the input needs of this model.")] = None,
    folds: Annotated[int, typer.Option(help="Folds of the intended pooled split.")] = 10,
    split: Annotated[str, typer.Option(help="Intended split policy: sample or cell.")] = "sample",
    strict: Annotated[bool, typer.Option(help="Treat fold problems as errors.")] = False,
    max_memory: MaxMemory = None,
) -> None:
    """Check a data set against the data contract and describe it; exit 1 on any error."""
    from scdrugmap.commands import run_check

    keys = _obs_keys(label_key, study_key, sample_key, tissue_key, cancer_type_key, therapy_key, regimen_key,
                     cell_type_key)
    ok = run_check(file, keys=keys, layer=layer, model=model, folds=folds, split=split, strict=strict,
                   console=stdout, errors=stderr, max_memory=max_memory)
    if not ok:
        raise typer.Exit(1)


# --- datasets ----------------------------------------------------------------------------------------------

@datasets_app.command("list")
def datasets_list(
    collection: Annotated[str | None, typer.Option(help="primary or validation.")] = None,
    tissue: Annotated[str | None, typer.Option(help="Filter by tissue (substring).")] = None,
    cancer_type: Annotated[str | None, typer.Option(help="Filter by cancer type (substring).")] = None,
    therapy: Annotated[str | None, typer.Option(help="Filter by therapy (substring).")] = None,
    regimen: Annotated[str | None, typer.Option(help="Filter by regimen (substring).")] = None,
) -> None:
    """List the curated data sets."""
    from scdrugmap.commands import show_catalog

    show_catalog(stdout, collection=collection, tissue=tissue, cancer_type=cancer_type, therapy=therapy,
                 regimen=regimen)


@datasets_app.command("show")
def datasets_show(dataset_id: Annotated[str, typer.Argument(help="Catalog id, e.g. P07.")]) -> None:
    """Show every fact of one curated data set."""
    from scdrugmap.commands import show_dataset

    show_dataset(stdout, dataset_id)


@datasets_app.command("import")
def datasets_import(
    source: Annotated[Path, typer.Argument(help="Folder of scDrugMap .tsv files.")],
    out: Annotated[Path, typer.Option(help="Folder for the .h5ad files.")] = Path("scdrugmap-data"),
) -> None:
    """Convert the scDrugMap distribution format (TSV per data set) into .h5ad files: all of them, or none."""
    from scdrugmap.commands import writing
    from scdrugmap.data.catalog import load_catalog
    from scdrugmap.data.io import import_distribution

    with writing(out):
        written = import_distribution(source, out, catalog=load_catalog())
    for path in written:
        stdout.print(str(path))


@datasets_app.command("simulate")
def datasets_simulate(
    cells: Annotated[int, typer.Option(help="Number of cells.")] = 4000,
    genes: Annotated[int, typer.Option(help="Number of genes (real human symbols).")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resistance_strength: Annotated[float | None, typer.Option(help="Strength of the drug-resistance program (default: the simulator's, as in the demo).")] = None,
    out: Annotated[Path, typer.Option(help="Output .h5ad file, or a folder for simulated.h5ad.")] = Path("simulated"),
) -> None:
    """Simulate a collection shaped like the catalog (marked as simulated), streamed to disk."""
    from scdrugmap.commands import writing
    from scdrugmap.data.simulate import DEFAULT_RESISTANCE_STRENGTH, simulate_collection

    path = out / "simulated.h5ad" if out.suffix != ".h5ad" else out
    strength = DEFAULT_RESISTANCE_STRENGTH if resistance_strength is None else resistance_strength
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        simulate_collection(n_cells=cells, n_genes=genes, seed=seed, resistance_strength=strength, out_path=path)
    stdout.print(f"{path} (SIMULATED: {cells} cells x {genes} genes, seed {seed})")


# --- models ------------------------------------------------------------------------------------------------

@models_app.command("list")
def models_list() -> None:
    """List every model: family, parameters, embedding width, input it needs, and whether weights are here."""
    from scdrugmap.commands import show_models

    show_models(stdout)


@models_app.command("info")
def models_info(name: Annotated[str, typer.Argument(help="Registry name, e.g. geneformer.")]) -> None:
    """Show a model's facts and where its official weights come from."""
    from scdrugmap.commands import show_model_info

    show_model_info(stdout, name)


@models_app.command("download")
def models_download(
    name: Annotated[str, typer.Argument(help="Model name, or name:variant.")],
    force: Annotated[bool, typer.Option(help="Download again even if cached.")] = False,
) -> None:
    """Download a model's official weights into the cache (SCDRUGMAP_HOME), with checksums and resume."""
    from scdrugmap.commands import download_model

    stdout.print(str(download_model(name, force=force, quiet=STATE["quiet"], console=stderr)))


# --- embed and benchmark -----------------------------------------------------------------------------------

@app.command()
def embed(
    data: Annotated[Path, typer.Argument(help="The .h5ad file.")],
    model: Annotated[str, typer.Option(help="Registry name of the model.")],
    weights: Annotated[Path | None, typer.Option(help="Local folder/file of the official weights.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output .h5ad, or .npy for the embeddings alone (default: add to DATA).")] = None,
    layer: Layer = None,
    batch_size: Annotated[int | None, typer.Option(help="Cells per forward pass (default: the model's own).")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when visible), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (the model's default for the device: float32 on CPU), float32, or bfloat16 (faster on CPU where the model's parity holds; `models info` says).")] = "auto",
    executor: Annotated[str, typer.Option(help="local, or ray: row shards embedded on a Ray cluster's workers.")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to use (auto, HOST:PORT); default: start one here.")] = None,
    shard_cells: Annotated[int, typer.Option(help="Cells per shard with --executor ray.")] = 20_000,
    cpus_per_shard: Annotated[float, typer.Option(help="CPUs each shard's task asks for.")] = 1.0,
    gpus_per_shard: Annotated[float, typer.Option(help="GPUs each shard's task asks for (1 on a GPU cluster).")] = 0.0,
    max_memory: MaxMemory = None,
) -> None:
    """Embed every cell with a model and store it in obsm['X_<model>']."""
    from scdrugmap.commands import run_embed

    path = run_embed(data, model=model, weights=weights, out=out, layer=layer, batch_size=batch_size, device=device,
                     dtype=dtype, executor=executor, ray_address=ray_address, shard_cells=shard_cells, cpus=cpus_per_shard,
                     gpus=gpus_per_shard, quiet=STATE["quiet"], console=stderr, max_memory=max_memory)
    stdout.print(str(path))


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Labelled .h5ad file to train on (every cell).")],
    model: Annotated[str, typer.Option(help="Registry name of the model.")],
    out: Annotated[Path, typer.Option(help="Folder for the head bundle.")],
    strategy: Annotated[str, typer.Option(help="frozen (head on embeddings) or lora (adapters + head).")] = "frozen",
    head: Annotated[str, typer.Option(help="Head of the frozen strategy: mlp or logistic.")] = "mlp",
    weights: Annotated[Path | None, typer.Option(help="Local folder/file of the official weights.")] = None,
    label_key: LabelKey = "response", sample_key: SampleKey = "sample", layer: Layer = None,
    seed: Annotated[int, typer.Option(help="Seed of training.")] = 0,
    device: Annotated[str, typer.Option(help="Where the model runs: auto (CUDA when visible), cpu, cuda or cuda:N.")] = "auto",
    max_memory: MaxMemory = None,
) -> None:
    """Train a head (or LoRA adapters + head) on a labelled data set and save it for `predict`."""
    from scdrugmap.commands import run_train

    stdout.print(str(run_train(data, model=model, out=out, strategy=strategy, head=head, weights=weights,
                               label_key=label_key, sample_key=sample_key, layer=layer, seed=seed, device=device,
                               max_memory=max_memory)))


@app.command()
def predict(
    data: Annotated[Path, typer.Argument(help="The .h5ad file of cells to predict.")],
    model: Annotated[str, typer.Option(help="Registry name of the model the head was trained on.")],
    head: Annotated[Path, typer.Option(help="Head bundle folder from `scdrugmap train`.")],
    weights: Annotated[Path | None, typer.Option(help="Local folder/file of the official weights.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output .h5ad (default: DATA with predictions).")] = None,
    csv: Annotated[Path | None, typer.Option(help="Output CSV (default: next to the output .h5ad).")] = None,
    layer: Layer = None,
    threshold: Annotated[float, typer.Option(help="Calibrated probability at or above which a cell is called "
                                                  "sensitive.")] = 0.5,
    alpha: Annotated[float | None, typer.Option(help="Miscoverage of the conformal prediction sets per class "
                                                     "(default: the head's, 0.1).")] = None,
    min_gene_overlap: Annotated[float, typer.Option(help="Refuse data holding less than this share of the head's "
                                                         "genes (harmonised ids).")] = 0.25,
    allow_value_kind_mismatch: Annotated[bool, typer.Option(help="Predict although the values are of another kind "
                                                                 "than the training data's (warns).")] = False,
    label_key: Annotated[str, typer.Option(help="obs column of observed labels to score against, when present.")
                         ] = "response",
    device: Annotated[str, typer.Option(help="Where the model runs: auto (CUDA when visible), cpu, cuda or cuda:N.")] = "auto",
    max_memory: MaxMemory = None,
) -> None:
    """Predict each cell's calibrated probability of sensitivity, prediction set and OOD flag; obs columns + CSV."""
    from scdrugmap.commands import run_predict

    for path in run_predict(data, model=model, bundle=head, weights=weights, out=out, csv=csv, layer=layer,
                            threshold=threshold, alpha=alpha, min_gene_overlap=min_gene_overlap,
                            allow_value_kind_mismatch=allow_value_kind_mismatch, label_key=label_key,
                            device=device, console=stdout, max_memory=max_memory):
        stdout.print(str(path))


@app.command()
def benchmark(
    config: Annotated[Path | None, typer.Option(help="YAML run config; command-line options override it.")] = None,
    data: Annotated[str | None, typer.Option(help="An .h5ad file, or 'demo' for the simulated collection.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated models (default pca,minilm,majority).")] = None,
    strategies: Annotated[str | None, typer.Option(help="Comma-separated strategies: frozen, lora, prompt.")] = None,
    heads: Annotated[str | None, typer.Option(help="Heads of the frozen strategy: mlp, logistic.")] = None,
    scenarios: Annotated[str | None, typer.Option(help="pooled, cross (leave-one-study-out); external is added by --test-data.")] = None,
    categories: Annotated[str | None, typer.Option(help="tissue, cancer_type, therapy, regimen.")] = None,
    split: Annotated[str | None, typer.Option(help="Pooled split policy: sample (grouped), cell, or sample,cell.")] = None,
    folds: Annotated[int | None, typer.Option(help="Folds of the pooled scenario (default 10).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of splits and training.")] = None,
    test_data: Annotated[Path | None, typer.Option(help="A labelled .h5ad to score on: heads trained on all of --data within each category value are tested on the same value here (scenario external).")] = None,
    permutations: Annotated[int | None, typer.Option(help="Label permutations for an empirical null of the frozen jobs (labels shuffled within each category value, per sample under split=sample); default 0.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (rerunning resumes it).")] = None,
    device: Annotated[str | None, typer.Option(help="auto (CUDA when visible; the default), cpu, cuda or cuda:N.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Embedding dtype of every model: auto (default), float32 or bfloat16 (refused by models whose parity does not hold; baselines stay float32).")] = None,
    executor: Annotated[str | None, typer.Option(help="local (default) or ray: one Ray task per unit of the grid.")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to use (auto, HOST:PORT, ray://...); default: start one here.")] = None,
    cpus_per_job: Annotated[float | None, typer.Option(help="CPUs each Ray task asks for (default 1).")] = None,
    gpus_per_job: Annotated[float | None, typer.Option(help="GPUs each Ray task asks for (default 0).")] = None,
    shard_cells: Annotated[int | None, typer.Option(help="Cells per embedding shard on Ray (default 20,000).")] = None,
    demo_cells: Annotated[int | None, typer.Option(help="Cells of the demo collection.")] = None,
    lora_epochs: Annotated[int | None, typer.Option(help="Epochs of LoRA fine-tuning per fold (default 5).")] = None,
    weights: Annotated[list[str] | None, typer.Option(help="MODEL=PATH: local official weights of a model (repeatable).")] = None,
    api_base: Annotated[str | None, typer.Option(help="OpenAI-compatible API root for the prompt strategy (OpenAI, or a vLLM/llama.cpp/Ollama .../v1).")] = None,
    llm_model: Annotated[str | None, typer.Option(help="Chat model of the prompt strategy (default gpt-4o-mini).")] = None,
    shots: Annotated[int | None, typer.Option(help="Labelled training cells shown in each prompt (0: zero-shot, as in the paper).")] = None,
    cells_per_request: Annotated[int | None, typer.Option(help="Cells per prompt (paper: 10).")] = None,
    genes_per_cell: Annotated[int | None, typer.Option(help="Most expressed genes listed per cell (paper: 10).")] = None,
    llm_concurrency: Annotated[int | None, typer.Option(help="Prompt requests in flight at once (default 4).")] = None,
    llm_requests_per_minute: Annotated[float | None, typer.Option(help="Most prompt requests started per minute.")] = None,
    llm_timeout: Annotated[float | None, typer.Option(help="Seconds to wait for the server (default 60).")] = None,
    llm_max_retries: Annotated[int | None, typer.Option(help="Retries on 429, 5xx and timeouts (default 5).")] = None,
    llm_max_tokens: Annotated[int | None, typer.Option(help="Cap on each answer's tokens (default none).")] = None,
    logprobs: Annotated[bool | None, typer.Option("--logprobs/--no-logprobs", help="Ask for token log-probabilities (needed for AUROC).")] = None,
    prompt_templates: Annotated[Path | None, typer.Option(help="Folder of replacement templates: user.txt, system.txt, few_shot.txt, example.txt, retry.txt.")] = None,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key (default OPENAI_API_KEY).")] = None,
    label_key: LabelKey = "response", study_key: StudyKey = "study", sample_key: SampleKey = "sample",
    tissue_key: TissueKey = "tissue", cancer_type_key: CancerKey = "cancer_type", therapy_key: TherapyKey = "therapy",
    regimen_key: RegimenKey = "regimen", cell_type_key: CellTypeKey = "cell_type", layer: Layer = None,
    max_memory: MaxMemory = None,
) -> None:
    """Run (or resume) the benchmark grid and print mean F1 and AUROC per model and category."""
    from scdrugmap.commands import run_benchmark_command

    # what the user gave (None: not given); BenchmarkConfig.resolve merges it over --config and the defaults
    overrides: dict[str, Any]
    overrides = {"data": data, "models": _split_list(models), "strategies": _split_list(strategies),
                 "heads": _split_list(heads), "scenarios": _split_list(scenarios),
                 "categories": _split_list(categories), "splits": _split_list(split), "folds": folds, "seed": seed, "permutations": permutations,
                 "test_data": None if test_data is None else str(test_data),
                 "out": None if out is None else str(out), "device": device, "dtype": dtype, "demo_cells": demo_cells,
                 "layer": layer,
                 "executor": executor, "ray_address": ray_address, "cpus_per_job": cpus_per_job,
                 "gpus_per_job": gpus_per_job, "shard_cells": shard_cells}
    overrides["prompt"] = {"api_base": api_base, "model": llm_model, "shots": shots,
                           "cells_per_request": cells_per_request, "genes_per_cell": genes_per_cell,
                           "max_concurrency": llm_concurrency, "requests_per_minute": llm_requests_per_minute,
                           "timeout": llm_timeout, "max_retries": llm_max_retries, "max_tokens": llm_max_tokens,
                           "logprobs": logprobs, "api_key_env": api_key_env,
                           "template_dir": None if prompt_templates is None else str(prompt_templates)}
    overrides["lora"] = {"epochs": lora_epochs}
    if weights:
        malformed = [w for w in weights if "=" not in w]
        if malformed:
            msg = f"--weights {malformed[0]}: expected MODEL=PATH, e.g. --weights scgpt=~/models/scGPT_human."
            raise ConfigError(msg)
        overrides["weights"] = dict(w.split("=", 1) for w in weights)
    keys = _obs_keys(label_key, study_key, sample_key, tissue_key, cancer_type_key, therapy_key, regimen_key,
                     cell_type_key)
    run_benchmark_command(config, overrides, keys, quiet=STATE["quiet"], console=stdout, progress_console=stderr,
                          max_memory=max_memory)


@app.command()
def biomarkers(
    data: Annotated[Path, typer.Argument(help="The .h5ad file of cells.")],
    model: Annotated[str, typer.Option(help="Registry name of the model (of the head, or of the run's jobs).")],
    out: Annotated[Path | None, typer.Option(help="Folder for the tables, figures and facts (default with --run: "
                                                  "RUN/biomarkers, which `scdrugmap report RUN` shows).")] = None,
    head: Annotated[Path | None, typer.Option(help="Head bundle from `scdrugmap train`: its predictions on DATA form "
                                                   "the predicted groups, and it is the model attributed.")] = None,
    run: Annotated[Path | None, typer.Option(help="A `scdrugmap benchmark` run folder on DATA: its out-of-fold "
                                                  "predictions form the predicted groups, and each fold's model, "
                                                  "retrained, is attributed on its own test cells.")] = None,
    label_key: LabelKey = "response", sample_key: SampleKey = "sample",
    cell_type_key: Annotated[str | None, typer.Option(help="obs column of cell types: test within each.")] = None,
    gene_sets: Annotated[Path | None, typer.Option(help="GMT file of gene sets for the enrichment (read from disk).")] = None,
    comparisons: Annotated[str | None, typer.Option(help="observed, predicted or both (default: observed when the "
                                                         "labels exist, predicted with --head or --run).")] = None,
    top_k: Annotated[int, typer.Option(help="Top genes per direction (stability, enrichment, deletion).")] = 20,
    cells: Annotated[int, typer.Option(help="Most cells attributed and deleted from.")] = 500,
    genes: Annotated[int, typer.Option(help="Most genes deleted in silico (0: none).")] = 50,
    steps: Annotated[int | None, typer.Option(help="Integrated-gradients steps (default: 50 for pca/hvg, 20 for token "
                                                   "models); raise it when the completeness error shown is large.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of samples for stability (0: none).")] = 20,
    layer: Layer = None,
    weights: Annotated[Path | None, typer.Option(help="Local folder/file of the official weights.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of cell sampling, bootstrap and permutations.")] = 0,
    device: Annotated[str, typer.Option(help="Where the model runs: auto (CUDA when visible), cpu, cuda or cuda:N.")] = "auto",
    max_memory: MaxMemory = None,
) -> None:
    """Find the genes that separate resistant from sensitive cells and the genes a model relies on."""
    from scdrugmap.commands import run_biomarkers

    for path in run_biomarkers(data, model=model, out=out, head=head, run=run, label_key=label_key,
                               sample_key=sample_key, cell_type_key=cell_type_key, gene_sets=gene_sets,
                               comparisons=_split_list(comparisons), top_k=top_k, cells=cells, genes=genes,
                               steps=steps, bootstrap=bootstrap, layer=layer, weights=weights, seed=seed, device=device,
                               quiet=STATE["quiet"], console=stdout, progress_console=stderr, max_memory=max_memory):
        stdout.print(str(path))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="The --out folder of a `scdrugmap benchmark` run.")],
    fmt: Annotated[str, typer.Option("--format", help="Comma-separated: html, png, svg, pdf.")] = "html,png",
    out: Annotated[Path | None, typer.Option(help="Where to write (default RUN_DIR/report).")] = None,
    projection: Annotated[str, typer.Option(help="Embedding maps: auto (UMAP, PCA if umap-learn is missing), umap, pca.")] = "auto",
    jobs: Annotated[int | None, typer.Option(help="Processes that draw the figures: 1, or 2 (default where two CPUs "
                                                  "are free to this process).")] = None,
) -> None:
    """Write figures, tables and a self-contained HTML report of a benchmark run."""
    from scdrugmap.startup import imports_settled

    with imports_settled():  # the report's modules, which write_report imports when it runs
        from scdrugmap.report import figures, html, tables, write_report  # noqa: F401

    for path in write_report(run_dir, out, formats=_split_list(fmt) or [], projection=projection, jobs=jobs):
        stdout.print(str(path))


@app.command()
def serve(
    db: Annotated[str | None, typer.Option("--db", envvar="SCDRUGMAP_DB",
                                           help="Database URL, e.g. postgresql://user:password@host/scdrugmap "
                                                "(default: a SQLite file under SCDRUGMAP_HOME/web).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    results: Annotated[list[Path] | None, typer.Option(
        "--results", help="A `scdrugmap benchmark` run folder to import into the database (repeat for several).",
        exists=True, file_okay=False)] = None,
    bundles: Annotated[Path | None, typer.Option(
        "--bundles", help="Folder whose sub-folders are head bundles (`scdrugmap train --out`) offered to every "
                          "user (default: SCDRUGMAP_HOME/web/bundles).")] = None,
    upload_dir: Annotated[Path | None, typer.Option(help="Where uploads are kept (never a served folder).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload, in MiB.")] = 500.0,
    max_concurrent_jobs: Annotated[int, typer.Option(help="Predictions running at once.")] = 1,
    job_memory_mb: Annotated[float, typer.Option(
        help="Address-space limit of each prediction's process, in MiB (0: none, needed for CUDA). Uploads whose "
             "data would not fit are refused at upload.")] = 8192.0,
    retention_hours: Annotated[float, typer.Option(help="Uploads and results are deleted this long after the "
                                                        "upload (default 7 days).")] = 168.0,
    disk_quota_mb: Annotated[float, typer.Option(help="Most disk the uploads and results may use, in MiB.")] = 20480.0,
    rate_limit: Annotated[list[str] | None, typer.Option(
        help="KIND=COUNT/SECONDS per client address, KIND one of upload, submit, lookup (repeatable; COUNT 0 "
             "turns it off). Default upload=20/60, submit=30/60, lookup=600/60.")] = None,
    allowed_origin: Annotated[list[str] | None, typer.Option(
        help="An origin (https://lab.example.org) whose pages may post to this server besides its own "
             "(repeatable); other cross-site posts are refused.")] = None,
) -> None:
    """Run the web server: catalog, benchmark explorer, and predictions on uploaded data (JSON logs on stderr)."""
    from scdrugmap.web import serve as run_server

    options: dict[str, object] = {} if bundles is None else {"bundle_dir": bundles}
    limits = {}
    for text in rate_limit or []:
        kind, _, value = text.partition("=")
        count, _, seconds = value.partition("/")
        try:
            limits[kind.strip()] = (int(count), float(seconds or 60))
        except ValueError:
            msg = f"--rate-limit {text}: expected KIND=COUNT/SECONDS, e.g. upload=20/60."
            raise ConfigError(msg) from None
    run_server(db, host=host, port=port, results=results or [], upload_dir=upload_dir, max_upload_mb=max_upload_mb,
               max_concurrent_jobs=max_concurrent_jobs, job_memory_mb=job_memory_mb, retention_hours=retention_hours,
               disk_quota_mb=disk_quota_mb, rate_limits=limits, allowed_origins=tuple(allowed_origin or ()),
               **options)


def fail(message: str) -> None:
    """Print ``message`` as one red line on stderr (escaped: ``[/x]`` in a path or value is text) and exit 1."""
    from rich.markup import escape

    line = " ".join(str(message).split())  # one line, whatever the message held
    stderr.print(f"[red]error:[/red] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(1)


def main() -> None:
    """Entry point: run the app, turning expected errors into one line and exit code 1.

    Expected: our own errors (`ScDrugMapError`), a refused file operation (a full disk, no permission:
    the path and the fix) and running out of memory. Anything else is a bug and keeps its traceback.
    """
    try:
        app()
    except ScDrugMapError as err:
        fail(str(err))
    except OSError as err:
        from scdrugmap.errors import describe_os_error

        fail(describe_os_error(err))
    except MemoryError:
        fail("ran out of memory. Give the data in smaller files, or set --max-memory to what this machine "
             "can spare so that inputs too large are refused before they are read.")


__all__ = ["ConfigError", "app", "main"]
