"""Reading what W&B wrote for an offline run, for the tests (test_wandb.py, test_tune.py).

An offline W&B run keeps every record it would upload in a `.wandb` file: LevelDB's log format (a 7-byte file
header, then chunks framed by a CRC-32 of type and data, length and type, in 32 KiB blocks) holding W&B's own
protobuf `Record`s. This reader is written from that format, not taken from fsdp_ft."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

BLOCK = 32 << 10
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    buf = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", buf[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(buf):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = buf[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: bad chunk at byte {pos}"
        pending += chunk
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def items(entries) -> dict:
    return {e.key or "/".join(e.nested_key): json.loads(e.value_json) for e in entries}


def offline_runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))


def history(records) -> list[dict]:
    return [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]


def isolated_wandb(monkeypatch, tmp_path, home: bool = True):
    """W&B with none of this machine's settings: no login (home: no ~/.netrc either), its folders in tmp_path."""
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME",
                "WANDB_DIR", "WANDB_SILENT"):
        monkeypatch.delenv(key, raising=False)
    if home:
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))


def summary(records) -> dict:
    """The run's summary as its updates leave it."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update(items(r.summary.update))
    return out
