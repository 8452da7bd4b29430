"""Inference (example.py): `prompts` (the Alpaca template), `generate` (batched, data-parallel,
resumable benchmark generation), `predictions` (prediction files and their partial files)."""
