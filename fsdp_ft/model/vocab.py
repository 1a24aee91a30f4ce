"""New chat tokens: a ChatML template for tokenizers without one, and the grown embedding rows they need.

A tokenizer with no chat template gets `<|im_start|>` / `<|im_end|>` as special tokens and a ChatML template
(with `{% generation %}` marks, so assistant tokens are known exactly). When that makes the tokenizer longer than
the model's vocabulary, the model is built with the larger vocabulary and `GrownVocabSource` serves the missing
rows of the embedding (and of an untied LM head) while each rank reads its shard: pretrained rows come from the
checkpoint, new rows are the mean of the pretrained rows (a start that changes no existing logit much and gives
the new tokens an average, not a random, meaning; cf. Hewitt 2021, "Initializing new word embeddings").
"""
from __future__ import annotations

import torch

from fsdp_ft.errors import ConfigError

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def ensure_chat_template(tokenizer) -> list[int]:
    """Give a template-less tokenizer ChatML; returns the ids of the ChatML tokens (their rows must train), or []
    when the tokenizer already has a chat template (it is then used as it is). Idempotent."""
    if getattr(tokenizer, "chat_template", None):
        return added_chat_tokens(tokenizer)
    tokenizer.add_tokens(list(CHATML_TOKENS), special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.fsdp_ft_chat_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in CHATML_TOKENS]
    return tokenizer.fsdp_ft_chat_token_ids


def added_chat_tokens(tokenizer) -> list[int]:
    """Ids of the ChatML tokens `ensure_chat_template` gave this tokenizer object ([] if it gave none)."""
    return list(getattr(tokenizer, "fsdp_ft_chat_token_ids", []))


def grow_config(hf_config, tokenizer) -> bool:
    """Enlarge the model's vocabulary to the tokenizer's length when added tokens do not fit; True if it grew."""
    size = len(tokenizer)
    if size <= hf_config.vocab_size:
        return False
    hf_config.vocab_size = size
    text = getattr(hf_config, "get_text_config", lambda: hf_config)()
    if text is not hf_config:
        text.vocab_size = size
    return True


def wrap_grown(source, model: torch.nn.Module, vocab_size: int, checkpoint_key):
    """`source`, or a `GrownVocabSource` over it when the model's vocab-sized tensors have more rows than the
    checkpoint's. `checkpoint_key(name)` maps a model tensor name to the checkpoint's key (or None)."""
    if source is None:
        return None
    old_rows = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.dim() == 0 or t.shape[0] != vocab_size:
            continue
        key = checkpoint_key(name)
        if key is None:
            continue
        shape = tuple(source.shape(key))
        if shape[0] < vocab_size and shape[1:] == tuple(t.shape[1:]):
            old_rows[key] = shape[0]
    return GrownVocabSource(source, old_rows) if old_rows else source


class GrownVocabSource:
    """A weight source whose vocab-sized tensors read rows past the checkpoint's end as the mean row."""

    def __init__(self, source, old_rows: dict[str, int]):
        self.source = source
        self.old_rows = old_rows
        self._means: dict[str, torch.Tensor] = {}

    def keys(self):
        return self.source.keys()

    def __contains__(self, name):
        return name in self.source

    def shape(self, name):
        return self.source.shape(name)

    def close(self):
        self.source.close()

    def mean_row(self, name: str, chunk: int = 4096) -> torch.Tensor:
        """Mean of the checkpoint's rows, read a chunk at a time (an embedding can be GBs)."""
        if name not in self._means:
            n = self.old_rows[name]
            total, dtype = None, None
            for start in range(0, n, chunk):
                rows = self.source.read_rows(name, start, min(start + chunk, n))
                dtype = rows.dtype
                part = rows.double().sum(0)
                total = part if total is None else total + part
            self._means[name] = (total / n).to(dtype).unsqueeze(0)
        return self._means[name]

    def read_rows(self, name, start, stop):
        n = self.old_rows.get(name)
        if n is None or stop <= n:
            return self.source.read_rows(name, start, stop)
        parts = [self.source.read_rows(name, start, n)] if start < n else []
        parts.append(self.mean_row(name).expand(stop - max(start, n), -1))
        return torch.cat(parts)


def check_rows_train(model: torch.nn.Module, method: str, new_ids: list[int]) -> None:
    """The new tokens' embedding rows must train, or the chat markers keep their initial (mean) meaning."""
    if not new_ids or method in ("lora", "qlora", "dora"):  # LoRA methods train them as trainable tokens
        return
    from fsdp_ft.model import adapters

    hf = adapters.base_model(model)
    layers = [hf.get_input_embeddings(), hf.get_output_embeddings()]
    if any(m is not None and not m.weight.requires_grad for m in layers):
        raise ConfigError(f"finetune.method={method}: the tokenizer has no chat template, so the ChatML tokens "
                          f"{list(CHATML_TOKENS)} were added, but the embedding or LM head rows they need are frozen; "
                          "let the embeddings and LM head train, use finetune.method=lora, or give a model whose "
                          "tokenizer has a chat template")
