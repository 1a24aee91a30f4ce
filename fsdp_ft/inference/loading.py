"""Load a trained model in one plain process for `fsdp-ft eval`, `generate` and `predict`.

A model is named by a run directory (its final/, or its newest checkpoint exported to a temporary folder when
there is no final/), an exported HF folder, or a PEFT adapter folder (base + adapter). No process group and no
FSDP: inference needs neither, and one process starts in seconds.

The model computes in the run's compute dtype (fsdp.param_dtype, else fsdp.mixed_precision; `auto` resolved for
this device, as training resolves it), so `fsdp-ft eval` gives the numbers of the run's own eval rows; a bare
folder follows `auto` (bf16 on a bf16 GPU, fp32 on the CPU). On a GPU the weights load straight onto it, in that
dtype, and train.tf32 applies as in training. A model that does not fit one GPU (or a `--max-memory` cap) is
spread over the GPUs, the CPU and a disk folder (`placement`).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fsdp_ft.checkpoint import dcp_checkpoint
from fsdp_ft.config import Config, load_config
from fsdp_ft.errors import CheckpointError, DataError, UserError
from fsdp_ft.inference import placement as where
from fsdp_ft.inference.placement import Placement
from fsdp_ft.model import adapters
from fsdp_ft.model.build import with_attention
from fsdp_ft.runtime import precision, tf32

PROMPT_METHODS = ("prefix", "prompt", "p_tuning")  # virtual tokens: cannot merge into plain weights


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    cfg: Config  # the run's config (or defaults for a bare folder) with the command's overrides
    folder: Path  # the HF or adapter folder the weights came from
    labels: list[str] | None = None  # classifier label names in id order
    max_length: int = 512  # truncation for predict: the run's train.seq_len, else the model's limit
    _keep: list = field(default_factory=list, repr=False)  # temporary export / offload folders: live as the model

    @property
    def task(self) -> str:
        return self.cfg.task

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (a spread model's parameters may sit on `meta`)."""
        return where.input_device(self.model)


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(spec: str, overrides: list[str] = (), trust_remote_code: bool = False,
               placement: Placement | None = None) -> LoadedModel:
    """A model from a run dir, an HF folder or a PEFT adapter folder, in eval mode on the local device (or spread
    over the devices, CPU and disk when it does not fit one, or as `placement` caps).

    Custom modelling code runs only when this command asks for it (`trust_remote_code`, or the override
    model.trust_remote_code=true): a run folder's own config.yaml cannot switch it on, since the folder may come
    from someone else."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would mix with the command's output
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"model '{spec}' " + ("is a file; give a folder" if path.exists() else "does not exist")
                              + " (a run directory, an exported model folder or a PEFT adapter folder)")
    trust = trust_remote_code or asks_remote_code(overrides)
    overrides = [*overrides, f"model.trust_remote_code={str(trust).lower()}"]  # the command decides, not the folder
    placement = placement or Placement()
    try:
        if (path / "config.yaml").is_file() and ((path / "final").is_dir() or (path / "checkpoints").is_dir()):
            return _load_run(path, overrides, placement)
        if (path / "adapter_config.json").is_file():
            return _load_adapter(path, overrides, placement)
        if (path / "config.json").is_file():
            return _load_folder(path, overrides, placement)
    except UserError as e:
        from fsdp_ft.checkpoint.export import needs_remote_code

        if not trust and needs_remote_code(e) and "--trust-remote-code" not in str(e):
            raise type(e)(f"{e} (pass --trust-remote-code if you trust '{spec}')") from None
        raise
    raise CheckpointError(f"model '{spec}' is neither a run directory (config.yaml + final/ or checkpoints/), an "
                          "exported model folder (config.json) nor a PEFT adapter folder (adapter_config.json)")


def asks_remote_code(overrides) -> bool:
    """Whether the command line's overrides turn model.trust_remote_code on (the last one wins)."""
    from fsdp_ft.config import parse_override

    asked = False
    for text in overrides:
        if "=" in text and text.split("=", 1)[0].strip() == "model.trust_remote_code":
            asked = parse_override(text)[1] is True
    return asked


# ---------------------------------------------------------------- the three kinds of folder

def _load_run(run: Path, overrides: list[str], placement: Placement) -> LoadedModel:
    from fsdp_ft.checkpoint.export import needs_remote_code, remote_code_hint, run_wants_remote_code

    cfg = precision.resolve_precision(load_config(run / "config.yaml", overrides), device())
    ignored = not cfg.model.trust_remote_code and run_wants_remote_code(run)
    try:
        return _load_run_model(run, cfg, placement)
    except UserError as e:
        if ignored and needs_remote_code(e):
            raise type(e)(remote_code_hint(run, e)) from None
        raise


def _load_run_model(run: Path, cfg: Config, placement: Placement) -> LoadedModel:
    final = run / "final"
    has_final = (final / "config.json").is_file() or (final / "adapter_config.json").is_file()
    if has_final and not adapters.is_peft(cfg):
        return _from_folder(final, cfg, placement, max_length=cfg.train.seq_len)
    # PEFT runs: merge the adapters of the checkpoint final/ came from into the base the run trained on (for
    # QLoRA the dequantized NF4 base), so the numbers match training even when the base was random-init
    ckpt = dcp_checkpoint.final_checkpoint(run)[0] if has_final else _newest(run)
    if not has_final:
        print(f"[fsdp_ft] '{run}' has no final/: using its newest checkpoint {ckpt.name}", file=sys.stderr)
    from fsdp_ft.checkpoint.export import export_checkpoint

    tmp = tempfile.TemporaryDirectory(prefix="fsdp-ft-model-")
    merge = adapters.is_peft(cfg) and cfg.finetune.method not in PROMPT_METHODS
    folder = export_checkpoint(run, ckpt, Path(tmp.name) / "model", merge_adapters=merge,
                               trust_remote_code=cfg.model.trust_remote_code)
    loaded = (_from_adapter(folder, cfg, placement, cfg.train.seq_len) if (folder / "adapter_config.json").is_file()
              else _from_folder(folder, cfg, placement, max_length=cfg.train.seq_len))
    loaded._keep.append(tmp)
    return loaded


def _newest(run: Path) -> Path:
    found = dcp_checkpoint.list_checkpoints(run)
    if not found:
        raise CheckpointError(f"run directory '{run}' has neither final/ nor a complete checkpoint")
    return found[-1][1]


def _bare_config(folder: Path, task: str, overrides: list[str]) -> Config:
    """Defaults for a folder without a run config; the command's overrides (task=..., data.text_column=...) win."""
    cfg = load_config(None, [f"output_dir={folder}", f"model.path={folder}", f"data.train={folder}",
                             f"task={task}", *overrides])
    return precision.resolve_precision(cfg, device())


def _load_folder(folder: Path, overrides: list[str], placement: Placement) -> LoadedModel:
    from transformers import AutoConfig

    trust = asks_remote_code(overrides)
    try:
        hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model '{folder}': unreadable config.json: {str(e).splitlines()[0]}") from None
    classifier = any(a.endswith("ForSequenceClassification") for a in (hf_config.architectures or []))
    return _from_folder(folder, _bare_config(folder, "seq_cls" if classifier else "causal_lm", overrides), placement)


def _load_adapter(folder: Path, overrides: list[str], placement: Placement) -> LoadedModel:
    from peft import PeftConfig

    peft_cfg = PeftConfig.from_pretrained(str(folder))
    task = "seq_cls" if str(peft_cfg.task_type) in ("SEQ_CLS", "TaskType.SEQ_CLS") else "causal_lm"
    return _from_adapter(folder, _bare_config(folder, task, overrides), placement)


# ---------------------------------------------------------------- building the model

def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "seq_cls":
        return AutoModelForSequenceClassification
    if task == "causal_lm":
        return AutoModelForCausalLM
    raise CheckpointError(f"task '{task}': eval, generate and predict support causal_lm and seq_cls models")


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype the run computed in: what FSDP cast its blocks to (fsdp.param_dtype or fsdp.mixed_precision,
    whatever model.dtype stored), or DeepSpeed's rule for engine deepspeed."""
    cfg = precision.resolve_precision(cfg, device())
    deepspeed = cfg.engine == "deepspeed"
    return precision.DTYPE[precision.deepspeed_compute_precision(cfg) if deepspeed else precision.compute_precision(cfg)]


def _from_pretrained(folder: Path | str, cfg: Config, what: str, **kwargs):
    """kwargs: placement.load_kwargs' device_map (straight onto the GPU, or spread; never a whole fp32 copy in
    host memory first) and the model class's own."""
    try:
        return with_attention(cfg, lambda **attn: _auto_class(cfg.task).from_pretrained(
            str(folder), dtype=compute_dtype(cfg), trust_remote_code=cfg.model.trust_remote_code, **kwargs, **attn))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} '{folder}' does not load as a {cfg.task} model: "
                              f"{str(e).strip().splitlines()[0][:300]}") from None


def _tokenizer(folder: Path, cfg: Config):
    from transformers import AutoTokenizer

    try:  # an explicit False: None would make transformers prompt on stdin for a folder with custom code
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"model '{folder}' has no usable tokenizer: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:  # as in training (model.load_tokenizer)
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def _model_limit(tok, hf_config) -> int:
    limits = [n for n in (tok.model_max_length, getattr(hf_config, "max_position_embeddings", None))
              if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else 512


def _finish(model, tok, cfg: Config, folder: Path, max_length: int | None, placement: Placement,
            placed: dict, offload_tmp) -> LoadedModel:
    tf32.apply(cfg.train.tf32, device())  # fp32 matmuls as training ran them (a GPU only)
    model = model.eval()  # already placed: by the device map (a GPU, a cap), else the plain load on the CPU
    if where.is_spread(model):  # the chunked head loss swaps the head's forward, which accelerate's hooks own
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, chunked_head_loss=False))
    line = where.describe(model, placement, placed.get("offload_folder"))
    if line:
        print(f"[fsdp_ft] {line}", file=sys.stderr)
    hf_config = adapters.base_model(model).config
    labels = None
    if cfg.task == "seq_cls":
        labels = [str(hf_config.id2label[i]) for i in range(hf_config.num_labels)]
    return LoadedModel(model, tok, cfg, folder, labels, max_length or _model_limit(tok, hf_config),
                       [offload_tmp] if offload_tmp else [])


def _from_folder(folder: Path, cfg: Config, placement: Placement, max_length: int | None = None) -> LoadedModel:
    placed, tmp = where.load_kwargs(placement)
    return _finish(_from_pretrained(folder, cfg, "model", **placed), _tokenizer(folder, cfg), cfg, folder,
                   max_length, placement, placed, tmp)


def _from_adapter(folder: Path, cfg: Config, placement: Placement, max_length: int | None = None) -> LoadedModel:
    """Base model from adapter_config.json's base_model_name_or_path, then the adapter on top (peft re-dispatches
    a base spread over the CPU or disk: it needs the same caps and offload folder, or it fills memory its way)."""
    from peft import PeftConfig

    base = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"adapter '{folder}': its base model '{base}' (base_model_name_or_path in "
                              "adapter_config.json) is not a local folder")
    kwargs = {}
    if cfg.task == "seq_cls":
        kwargs["num_labels"] = _adapter_num_labels(folder)
    placed, tmp = where.load_kwargs(placement)
    model = where.add_adapter(_from_pretrained(Path(base).resolve(), cfg, "base model", **kwargs, **placed),
                              folder, placed)
    return _finish(model, _tokenizer(folder, cfg), cfg, folder, max_length, placement, placed, tmp)


def _adapter_num_labels(folder: Path) -> int:
    """Classifier rows in the adapter file (peft saves the new head as a module to save)."""
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"adapter '{folder}' has no adapter_model.safetensors")
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            leaf = key.split(".")
            if leaf[-1] == "weight" and ({"classifier", "score"} & set(leaf)) and "lora_A" not in key \
                    and "lora_B" not in key:
                return f.get_slice(key).get_shape()[0]
    raise CheckpointError(f"adapter '{folder}' is a classification adapter without a classifier head")


# ---------------------------------------------------------------- JSON Lines input

def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; a bad line fails naming the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what}: file '{path}' " + ("is not a file" if p.exists() else "does not exist"))
    from fsdp_ft.data.splits import check_utf8

    check_utf8(p, f"{what}: file '{path}'")
    rows = []
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{what}: file '{path}' line {n} is not valid JSON: {e.msg} "
                                f"(column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{what}: file '{path}' line {n} is not a JSON object")
            rows.append((n, row))
    if not rows:
        raise DataError(f"{what}: file '{path}' has no rows")
    return rows


def text_field(row: dict, column: str, path: str, line: int, what: str, option: str) -> str:
    """The non-empty text in `column`, else a one-line error naming file, line and the option to change."""
    if column not in row:
        raise DataError(f"{what}: file '{path}' line {line} has no column '{column}' (it has {sorted(row)}); "
                        f"set {option}")
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{what}: file '{path}' line {line} has no text in column '{column}'")
    return value
