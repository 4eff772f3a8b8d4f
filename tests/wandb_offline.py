"""Read an offline W&B run file (`run-ID.wandb`) with wandb's own protobuf records.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each
chunk `crc32 (4) | length (2, little-endian) | type (1) | data`; a record is one FULL
chunk or FIRST, MIDDLE..., LAST chunks. Decoding uses `wandb.proto.wandb_internal_pb2`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER = 7
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # too little room for a chunk header: the block is padded
            offset += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_run(run_dir: Path) -> dict:
    """{"run_id", "history": [ {key: value} ], "config": {key: value}, "step_metrics": {metric
    name or glob: its x-axis metric}} of one offline run folder."""
    (run_file,) = Path(run_dir).glob("run-*.wandb")
    run_id, history, config, step_metrics = None, [], {}, {}
    for record in _records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "metric" and record.metric.step_metric:
            step_metrics[record.metric.name or record.metric.glob_name] = record.metric.step_metric
        if kind == "run":
            run_id = record.run.run_id
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        else:
            updates = []
        for item in updates:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return {"run_id": run_id, "history": history, "config": config, "step_metrics": step_metrics}
