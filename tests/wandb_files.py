"""Read a W&B offline run file (run-<id>.wandb) back: its history rows, config and summary.

The file is a LevelDB-style log (32 KiB blocks of checksummed chunks) of `wandb_internal_pb2.Record`
protobufs. wandb ships no reader any more, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, _version = _FILE_HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    pos, out, pending = _FILE_HEADER.size, [], b""
    while pos + _CHUNK_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _CHUNK_HEADER.size:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding
            pos += room
            continue
        body = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        pos += _CHUNK_HEADER.size + length
        if kind == _FULL:
            pending = body
        elif kind == _FIRST:
            pending = body
            continue
        elif kind == _MIDDLE:
            pending += body
            continue
        elif kind == _LAST:
            pending += body
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def history(path: Path) -> list[dict]:
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def _updates(path: Path, kind: str) -> dict:
    """Key -> value of every `kind` record's update items ("config" or "summary"), the last one winning."""
    found = {}
    for record in records(path):
        if record.WhichOneof("record_type") == kind:
            for item in getattr(record, kind).update:
                key = item.key or "/".join(item.nested_key)
                found[key] = json.loads(item.value_json)
    return found


def config(path: Path) -> dict:
    return _updates(path, "config")


def summary(path: Path) -> dict:
    """The run's summary as the file last sets it (history rows update it too: keys logged each step)."""
    return _updates(path, "summary")
