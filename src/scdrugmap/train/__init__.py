"""The training room: classification heads, the frozen-embedding strategy, LoRA fine-tuning, and the trust layer (calibration, conformal sets, OOD flags)."""
