"""Biomarkers: which genes separate resistant from sensitive cells, which genes drive a model, how stable.

``de``: differential expression (Wilcoxon per cell type, pseudobulk DESeq2 per sample).
``attribution``: per-gene attributions of a trained head (gradients, integrated gradients, in-silico deletion).
``token_hooks``: where integrated gradients reach into each token model (embedding point, baseline, genes).
``stability``: top-k overlap across folds and resamples, and the label-permutation null.
``enrichment``: over-representation and rank-based enrichment over a GMT gene-set collection.

Every function here is a plain function over AnnData, numpy and pandas; scanpy, pydeseq2, captum and
gseapy (the ``explain`` extra) are imported inside the functions that need them.
"""
