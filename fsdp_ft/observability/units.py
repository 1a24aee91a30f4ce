"""Sizes as people read them, the same in every output (plan tables, the HTML report)."""


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KiB': binary units, two decimals; plain bytes below one KiB."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
