"""FSDP2 wrapping, block discovery, and the CPU-only gloo communication (gloo_reduce, host_buffers)."""
