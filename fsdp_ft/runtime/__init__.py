"""The process: ranks and collectives, signals, per-rank logs, malloc, precision and TF32."""
