"""Inference (example.py, evaluate_loss.py): `generate` (batched, data-parallel, resumable benchmark
generation), `loss` (the held-out loss of reference outputs), `rowjob` (the resumable pass over a test
file's rows both make), `predictions` (output files and their partial files), `dtype` (the weights'
dtype)."""
