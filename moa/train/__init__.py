"""Training (main_finetune.py): `data` (rows, masking, batching), `schedule` (LR schedule, AdamW),
`loss` (label-only cross-entropy), `distributed` (torchrun process group, DDP), `checkpointing`,
`trainer` (the loop)."""
