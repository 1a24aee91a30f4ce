"""The typed run config: YAML and overrides become a `Config`, checked before anything runs. Never imports torch.

`schema` holds the dataclasses, `load` reads files and overrides, `validate` the cross-field checks, `extras` the
optional packages a config needs. The names
below are the package's public face: import them from `fsdp_ft.config`."""
from fsdp_ft.config.extras import require_extras
from fsdp_ft.config.load import (TUNE_SECTION, config_from_dict, dump_config, help_text, load_config, parse_override,
                                 read_tree, show_value)
from fsdp_ft.config.schema import DTYPES, Config, all_keys
from fsdp_ft.config.validate import read_user_config

__all__ = ["DTYPES", "TUNE_SECTION", "Config", "all_keys", "config_from_dict", "dump_config", "help_text",
           "load_config", "parse_override", "read_tree", "read_user_config", "require_extras", "show_value"]
