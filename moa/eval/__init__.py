"""Scoring (evaluate_math.py, evaluate_commonsense.py): pure Python, no torch."""
