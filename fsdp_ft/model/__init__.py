"""Model folder, tokenizer and meta build; PEFT adapters; which parameters train; device placement."""
