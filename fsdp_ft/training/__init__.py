"""The training loop and its parts, the set-up both engines share, the FSDP2 and DeepSpeed engines."""
