"""Hyper-parameter search with Optuna: each trial an ordinary run in output_dir/trials/NNNN (docs/tuning.md)."""
