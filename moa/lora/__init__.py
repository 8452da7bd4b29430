"""LoRA algebra (scripts/lora_tools.py): `algebra` (merge into a base, SVD extraction from two
bases, plain-LoRA files), `combine` (linear, cat, svd, ties, dare, ...) and `peft` (plain LoRAs to and
from PEFT's adapter folder)."""
