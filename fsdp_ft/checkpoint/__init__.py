"""Run-directory checkpoints (DCP, DeepSpeed), run identity, and export to HF or PEFT (final/)."""
