"""fsdp_ft: fine-tune pretrained transformers on FSDP2, from one CPU to SLURM clusters.

The Python API is small (`fsdp_ft.api`):

    import fsdp_ft
    cfg = fsdp_ft.load_config("configs/tiny.yaml", ["train.max_steps=20"])
    result = fsdp_ft.train(cfg)   # result.model, result.tokenizer, result.state, result.output_dir

The names are resolved on first use, so `import fsdp_ft` (and loading a config) does not import torch.
docs/architecture.md shows the packages and their layers.
"""
__all__ = ["Config", "load_config", "train"]


def __getattr__(name: str):
    if name in __all__:
        from fsdp_ft import api

        return getattr(api, name)
    raise AttributeError(f"module 'fsdp_ft' has no attribute '{name}'")
