"""Causal LM SFT rows -> token ids with a per-token completion flag, for every supported data format.

| data.format         | row                                             | completion (trained by default)        |
|---------------------|-------------------------------------------------|----------------------------------------|
| `text`              | text column                                     | every token                            |
| `prompt_completion` | prompt and completion columns (strings)         | the completion and the EOS after it    |
| `chat`              | a list of {role, content} messages              | every assistant turn, end-of-turn incl. |
| `alpaca`            | instruction, optional input, output             | the output (rendered as a chat)        |
| `sharegpt`          | a list of {from, value} (human/gpt/system)      | every gpt turn (rendered as a chat)    |

`auto` picks the format from the columns. Chat-like rows go through the tokenizer's chat template (see
`render_chat`); a tokenizer without one gets ChatML (`fsdp_ft.model.vocab`). Problems with a row are reported as
`RowError` (the data is malformed: fail, naming the row) or `SkipRow` (nothing to learn from it: drop and count).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FORMATS = ("auto", "text", "prompt_completion", "chat", "alpaca", "sharegpt")
CHAT_FORMATS = ("chat", "alpaca", "sharegpt")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool"}
ALPACA_COLUMNS = ("instruction", "input", "output")
TRUNCATION = ("keep_completion", "keep_start", "drop")


class RowError(ValueError):
    """The row does not have the format's shape (a schema error): the run fails, naming file and row."""


class SkipRow(Exception):
    """The row holds nothing to train on (empty text, no answer): it is dropped and counted under `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    """Token ids and, per token, whether it is completion (answer / assistant) rather than prompt."""
    ids: list[int]
    completion: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- formats and their columns

def messages_column(fmt: str, data_cfg) -> str:
    return data_cfg.messages_column or ("conversations" if fmt == "sharegpt" else "messages")


def detect_format(column_names: list[str], data_cfg) -> str:
    """`auto`: chat messages, then ShareGPT conversations, then Alpaca, then prompt/completion, else plain text."""
    cols = set(column_names)
    if messages_column("chat", data_cfg) in cols:
        return "chat"
    if messages_column("sharegpt", data_cfg) in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {data_cfg.prompt_column, data_cfg.completion_column} <= cols:
        return "prompt_completion"
    return "text"


def required_columns(fmt: str, data_cfg) -> list[str]:
    if fmt == "text":
        return [data_cfg.text_column]
    if fmt == "prompt_completion":
        return [data_cfg.prompt_column, data_cfg.completion_column]
    if fmt == "alpaca":
        return ["instruction", "output"]  # input is optional
    return [messages_column(fmt, data_cfg)]


# ---------------------------------------------------------------- row -> Sample

def row_to_sample(row: dict, fmt: str, tokenizer, data_cfg) -> Sample:
    """One row of `fmt` as tokens with completion flags (before truncation)."""
    if fmt == "text":
        return _text_sample(row.get(data_cfg.text_column), tokenizer)
    if fmt == "prompt_completion":
        return _prompt_completion_sample(row, tokenizer, data_cfg)
    if fmt == "alpaca":
        messages = alpaca_messages(row)
    elif fmt == "sharegpt":
        messages = sharegpt_messages(row.get(messages_column(fmt, data_cfg)))
    else:
        messages = chat_messages(row.get(messages_column(fmt, data_cfg)))
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SkipRow("no_answer", "no assistant message with text")
    return render_chat(tokenizer, messages)


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _text_sample(text, tokenizer) -> Sample:
    """The tokenizer's special tokens (e.g. BOS), the text, EOS; every token trains."""
    if not isinstance(text, str) or not text.strip():
        raise SkipRow("empty_text", "empty text")
    ids = _with_eos(tokenizer(text, add_special_tokens=True)["input_ids"], tokenizer)
    return Sample(ids, [True] * len(ids))


def _prompt_completion_sample(row: dict, tokenizer, data_cfg) -> Sample:
    """Prompt with the tokenizer's special tokens, then completion + EOS, tokenized apart: the prompt's tokens are
    exactly those a user's prompt gets at inference."""
    prompt, completion = row.get(data_cfg.prompt_column), row.get(data_cfg.completion_column)
    for col, value in ((data_cfg.prompt_column, prompt), (data_cfg.completion_column, completion)):
        if value is not None and not isinstance(value, str):
            raise RowError(f"column '{col}' must be text, got {type(value).__name__}")
    if not completion or not completion.strip():
        raise SkipRow("empty_completion", f"empty '{data_cfg.completion_column}'")
    prompt_ids = tokenizer(prompt or "", add_special_tokens=True)["input_ids"]
    answer = _with_eos(tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer)
    return Sample(prompt_ids + answer, [False] * len(prompt_ids) + [True] * len(answer))


def chat_messages(messages) -> list[dict]:
    """Check a {role, content} message list; returns clean copies (only role and content)."""
    if not isinstance(messages, list) or not messages:
        raise RowError(f"expected a non-empty list of {{role, content}} messages, got {_show(messages)}")
    out = []
    for k, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or m.get("role") is None:
            hint = "; set data.format=sharegpt" if isinstance(m, dict) and m.get("from") is not None else ""
            raise RowError(f"message {k} is not a {{role, content}} object: {_show(m)}{hint}")
        if m["role"] not in ROLES:
            raise RowError(f"message {k} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise RowError(f"message {k} ({m['role']}) has no text content: {_show(m.get('content'))}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def sharegpt_messages(conversations) -> list[dict]:
    """ShareGPT {from, value} turns as chat messages: human -> user, gpt -> assistant, system -> system."""
    if not isinstance(conversations, list) or not conversations:
        raise RowError(f"expected a non-empty list of {{from, value}} turns, got {_show(conversations)}")
    out = []
    for k, turn in enumerate(conversations, 1):
        if not isinstance(turn, dict) or turn.get("from") is None:
            raise RowError(f"turn {k} is not a {{from, value}} object: {_show(turn)}")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RowError(f"turn {k} has unknown role {turn['from']!r} (known: {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(turn.get("value"), str):
            raise RowError(f"turn {k} ({turn['from']}) has no text value: {_show(turn.get('value'))}")
        out.append({"role": role, "content": turn["value"]})
    return out


def alpaca_messages(row: dict) -> list[dict]:
    """Instruction (and input, after a blank line) as the user turn, output as the assistant turn."""
    parts = []
    for col in ALPACA_COLUMNS:
        value = row.get(col)
        if value is not None and not isinstance(value, str):
            raise RowError(f"column '{col}' must be text, got {type(value).__name__}")
        parts.append(value or "")
    instruction, extra, output = parts
    if not instruction.strip():
        raise SkipRow("empty_text", "empty 'instruction'")
    if not output.strip():
        raise SkipRow("empty_completion", "empty 'output'")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _show(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------- chat template rendering

def has_generation_marks(tokenizer) -> bool:
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", getattr(tokenizer, "chat_template", None) or ""))


def render_chat(tokenizer, messages: list[dict]) -> Sample:
    """A conversation through the tokenizer's chat template: ids, and which tokens are assistant tokens.

    Assistant tokens are each assistant turn's text as the template renders it, with what follows the content up
    to the turn's end (the end-of-turn token, e.g. `<|im_end|>` or `<|eot_id|>`), but not the whitespace after it.
    Two ways to find them, both on the character spans of one rendering of the whole conversation, mapped to the
    tokens of that rendering (so token boundaries are the real ones):
    - a template with `{% generation %}` marks says itself which text is the assistant's
      (`return_assistant_tokens_mask`);
    - any other template is rendered up to each assistant turn with the generation prompt, and up to its end: the
      text between the two is that turn. This needs a template that renders earlier turns the same whatever
      follows them (true of ChatML, Llama, Mistral, SmolLM templates); one that does not is an error, not a guess.
    """
    if has_generation_marks(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return Sample(ids, [bool(m) for m in out["assistant_masks"]])
    full = _template(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], add_generation_prompt=True)
        through = _template(tokenizer, messages[:i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise RowError("the chat template renders an earlier turn differently once later turns follow, so the "
                           "assistant tokens cannot be found; use a template with {% generation %} marks")
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    flags = [any(start < b and end > a for a, b in spans) for start, end in enc["offset_mapping"]]
    return Sample(list(enc["input_ids"]), flags)


def _template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja's raise_exception (e.g. "roles must alternate user/assistant")
        raise RowError(f"the chat template rejects this conversation: {str(e).splitlines()[0][:200]}") from None


# ---------------------------------------------------------------- truncation and labels

def truncate(sample: Sample, limit: int, policy: str) -> Sample | None:
    """Fit a sample into `limit` tokens; None when the policy drops it.

    keep_completion: the prompt before the first completion token loses tokens from its start, all but its first
      token (BOS, or the template's first marker), so the completion stays whole and its first token is still
      predicted from something; a completion longer than that loses its end. A row with no prompt (plain text)
      keeps its start.
    keep_start: every row keeps its first `limit` tokens.
    drop: over-long rows are dropped (and counted).
    """
    n = len(sample)
    if n <= limit:
        return sample
    if policy == "drop":
        return None
    if policy == "keep_completion":
        prompt = next((i for i, c in enumerate(sample.completion) if c), n)
        cut = min(n - limit, max(prompt - 1, 0))
        if cut:
            sample = Sample(sample.ids[:1] + sample.ids[1 + cut:], sample.completion[:1] + sample.completion[1 + cut:])
    return Sample(sample.ids[:limit], sample.completion[:limit])


def labels_for(sample: Sample, loss_on: str, ignore: int = -100) -> list[int]:
    """Labels: the token itself where it carries loss, `ignore` elsewhere (loss_on=all: every token)."""
    if loss_on == "all":
        return list(sample.ids)
    return [t if c else ignore for t, c in zip(sample.ids, sample.completion)]
