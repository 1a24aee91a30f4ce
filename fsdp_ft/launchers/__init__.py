"""`fsdp-ft run` (torchrun) and `fsdp-ft submit` (SLURM through submitit)."""
