"""`fsdp-ft plan`: peak memory per rank, simulated on the meta device."""
