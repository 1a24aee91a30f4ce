"""What a run measures (MFU, memory, traces, metrics.jsonl) and the HTML report."""
