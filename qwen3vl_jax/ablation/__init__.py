"""Ablation sweeps: run variants x seeds, aggregate with confidence intervals (experiments/ablate.py)."""
