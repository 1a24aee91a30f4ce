"""The typed run config: YAML and overrides become a `Config`, checked before anything runs. Never imports torch.

`schema` holds the dataclasses, `load` reads files and overrides, `validate` the cross-field checks. The names
below are the package's public face: import them from `fsdp_ft.config`."""
from fsdp_ft.config.load import config_from_dict, dump_config, help_text, load_config, parse_override
from fsdp_ft.config.schema import DTYPES, Config, all_keys
from fsdp_ft.config.validate import read_user_config

__all__ = ["DTYPES", "Config", "all_keys", "config_from_dict", "dump_config", "help_text", "load_config",
           "parse_override", "read_user_config"]
