"""Read the records of an offline W&B run file (`run-*.wandb`), for tests.

wandb 0.31 ships no Python reader. The file is a LevelDB-style log: a 7-byte header
(":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a 4-byte CRC,
a 2-byte little-endian length and a 1-byte type (1 full, 2 first, 3 middle, 4 last); each
assembled record is a serialized `wandb_internal_pb2.Record`.
"""
import json
import struct

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7


def records(path):
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zero fill at the end
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def history(path):
    """The logged rows: [{key: value, ..., '_step': step}, ...]."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.history.item})
    return rows


def config(path):
    out = {}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind in ("config", "run"):  # the initial config travels in the run record
            for it in (rec.config.update if kind == "config" else rec.run.config.update):
                out[it.key or "/".join(it.nested_key)] = json.loads(it.value_json)
    return out
