"""FSDP2 (``torch.distributed.fsdp.fully_shard``, what recent accelerate and TRL use) is detected
as sharded, like FSDP1 and ZeRO-3, so the probe pass runs the full forward on every rank in step
instead of stopping after the deepest hook; and the logit lens (residual directions) reads the
whole LM head, not a rank's DTensor shard. Real ``fully_shard`` on a gloo group, in a child
process (a process group in the test process would outlive the test). The 2-process training
run: test_fsdp2_training.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

CHILD = r"""
import json, os, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from drift_monitor.demo.tiny import build_llama
from drift_monitor.probe.capture import is_sharded
from drift_monitor.probe.residual import logit_lens_weights
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
m = build_llama(100, hidden=32, layers=2, seed=0)
out = {"plain": is_sharded(m)}
want = [w.detach().clone() for w in logit_lens_weights(m)]
for layer in m.model.layers:
    fully_shard(layer, reshard_after_forward=True)
fully_shard(m, reshard_after_forward=True)  # as accelerate: the LM head is a shard between forwards
out["fully_shard"] = is_sharded(m)
with torch.no_grad():
    m(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
got = logit_lens_weights(m)
out["head_sharded"] = type(m.lm_head.weight).__name__ == "DTensor"
out["lens_whole"] = all(type(g) is torch.Tensor and torch.equal(g, w) for g, w in zip(got, want))
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
    assert out == {"plain": False, "fully_shard": True, "head_sharded": True, "lens_whole": True}
