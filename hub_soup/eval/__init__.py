"""Scoring models on a small eval set: the evaluator, greedy soups with BatchNorm
recalibration, and the diagnosis of why a soup does not help."""
