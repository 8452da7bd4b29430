"""LoRA algebra (scripts/lora_tools.py): `algebra` (merge into a base, SVD extraction from two
bases, plain-LoRA files) and `combine` (linear, cat, svd, ties, dare, ...)."""
