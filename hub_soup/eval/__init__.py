"""Scoring models on a small eval set: the evaluator, its tasks (what is measured) and backends
(where models run), scores and their metrics, greedy soups with BatchNorm recalibration, and the
diagnosis of why a soup does not help."""
