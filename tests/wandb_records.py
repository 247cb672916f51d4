"""Reading an offline wandb run's records in tests (shared by test_tune.py and
test_durability.py)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run's ``.wandb`` file (what `wandb sync`
    uploads): a LevelDB-style log of protobuf records, read here directly."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # a whole record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows
