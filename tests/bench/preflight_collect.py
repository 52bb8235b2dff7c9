"""Raw pre-flight readings of every detection-suite dataset (exploration helper; see preflight_report.py)."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from drift_monitor.demo import suite as S
from drift_monitor.demo.testbed import build_testbed
from drift_monitor.offline.directions_ablation import post_instruction_tokens
from drift_monitor.preflight.engine import Example, own_responses, read_examples, start_reference
from drift_monitor.probe.probes import ProbeSet


def main(names: list[str]) -> None:
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    tb = build_testbed(quiet=True)
    out_dir = tb.path / "preflight-raw"
    out_dir.mkdir(exist_ok=True)
    probes = ProbeSet.default().records
    harmful = [r.prompt for r in probes if r.category == "harmful"]
    harmless = [r.prompt for r in probes if r.category == "harmless"]
    tok = tb.tokenizer()
    n_post = post_instruction_tokens(tok)
    models: dict[str, tuple] = {}
    chosen = [S.scenario(n) for n in names]
    for start in sorted({s.start for s in chosen}):
        m = S._start_model(tb, chosen[[c.start for c in chosen].index(start)], True)
        m.eval()
        ref = start_reference(m, tok, harmful, harmless, None)
        models[start] = (m, ref)
        cache = out_dir / f"own-{start}.json"
        own = json.loads(cache.read_text()) if cache.is_file() else {}
        todo = sorted({p for s in chosen if s.start == start for p, _ in S.rows(tb, s)} - set(own))
        for lo in range(0, len(todo), 64):
            t0 = time.time()
            chunk = todo[lo:lo + 64]
            vals, texts = own_responses(m, tok, [Example("", p) for p in chunk], ref, max_new_tokens=MAX_NEW,
                                        batch_size=32)
            for p, v, t in zip(chunk, vals, texts):
                own[p] = [v.tolist(), t]
            cache.write_text(json.dumps(own))
            print(f"{start}: own answers {lo + len(chunk)}/{len(todo)} ({time.time() - t0:.0f}s)", flush=True)
    for s in chosen:
        dest = out_dir / f"{s.name}.npz"
        if dest.is_file():
            continue
        model, ref = models[s.start]
        own = json.loads((out_dir / f"own-{s.start}.json").read_text())
        rows = S.rows(tb, s)
        ex = [Example(r, p) for p, r in rows]
        t0 = time.time()
        train, post, counts = read_examples(model, tok, ex, ref, n_post=n_post)
        np.savez(dest, train=train, post=post, own=np.array([own[p][0] for p, _ in rows], dtype=float),
                 counts=counts, gap=ref.gap.numpy(), prompts=np.array([p for p, _ in rows]),
                 responses=np.array([r for _, r in rows]), own_text=np.array([own[p][1] for p, _ in rows]))
        print(f"{s.name}: {len(rows)} examples ({time.time() - t0:.0f}s)", flush=True)


MAX_NEW = 24


if __name__ == "__main__":
    main(sys.argv[1:] or [s.name for s in S.SUITE])
