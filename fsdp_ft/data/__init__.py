"""Rows from files or the hub; rows to token ids; packing."""
