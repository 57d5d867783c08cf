"""The training room: classification heads, the frozen-embedding strategy and LoRA fine-tuning."""
