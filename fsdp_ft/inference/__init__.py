"""One process, no FSDP: `fsdp-ft eval`, `generate` and `predict`."""
