"""Read an offline W&B run file (run-<id>.wandb) back into its records, without the wandb service.

Format (wandb 0.31): a 7-byte file header, then a LevelDB-style log of 32 KiB blocks. Each record chunk has a
7-byte header (crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last; little-endian);
a block with fewer than 7 bytes left is padded. A reassembled payload is a wandb_internal_pb2.Record.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER, FILE_HEADER = 32 * 1024, 7, 7


def records(path: Path) -> list:
    data = Path(path).read_bytes()[FILE_HEADER:]
    out, pending, pos = [], b"", 0
    while pos + HEADER <= len(data):
        left = BLOCK - ((pos + FILE_HEADER) % BLOCK)
        if left < HEADER:  # block padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def summary_and_history(path: Path) -> tuple[dict, list[dict], dict, str]:
    """(summary, history rows, config, group) of a run file."""
    summary, history, config, group = {}, [], {}, ""
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                summary[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "run":
            group = rec.run.run_group or group
            for i in rec.run.config.update:
                config[i.key] = json.loads(i.value_json)
        elif kind == "config":
            for i in rec.config.update:
                config[i.key] = json.loads(i.value_json)
    return summary, history, config, group



def media(row: dict, key: str) -> dict:
    """A logged media value (wandb.Table, wandb.Image) of a history row or summary: wandb stores its fields
    as nested keys, which summary_and_history joins with "/"."""
    return {k[len(key) + 1:]: v for k, v in row.items() if k.startswith(key + "/")}


def table(run_file: Path, row: dict, key: str) -> dict:
    """A logged wandb.Table as {"columns", "data"}: the file the run keeps under files/."""
    value = media(row, key)
    assert value.get("_type") == "table-file", value
    return json.loads((Path(run_file).parent / "files" / value["path"]).read_text())
