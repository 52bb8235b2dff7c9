"""FSDP2 (``torch.distributed.fsdp.fully_shard``, what recent accelerate and TRL use) is detected
as sharded, like FSDP1 and ZeRO-3, so the probe pass runs the full forward on every rank in step
instead of stopping after the deepest hook. Real ``fully_shard`` on a gloo group, in a child
process (a process group in the test process would outlive the test)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

CHILD = r"""
import json, os, sys
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from drift_monitor.demo.tiny import build_llama
from drift_monitor.probe.capture import is_sharded
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
m = build_llama(100, hidden=32, layers=2, seed=0)
out = {"plain": is_sharded(m)}
for layer in m.model.layers:
    fully_shard(layer)
fully_shard(m)
out["fully_shard"] = is_sharded(m)
dist.destroy_process_group()
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fully_shard_is_detected_as_sharded():
    res = subprocess.run([sys.executable, "-c", CHILD, str(_free_port())], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"plain": False, "fully_shard": True}
