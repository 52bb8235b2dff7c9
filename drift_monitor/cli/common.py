"""Argument helpers several subcommands share: HOOK=SOURCE specs, the model-pair and run options, --json."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def parse_saes(specs: list[str]) -> dict[str, str]:
    saes: dict[str, str] = {}
    for spec in specs:
        hook, sep, source = spec.partition("=")
        if not sep or not hook or not source:
            raise ConfigError(f"--sae {spec!r}: expected HOOK=SOURCE, e.g. --sae model.layers.12=path/to/sae_dir")
        saes[hook] = source
    return saes


def parse_directions(specs: list[str]) -> dict[str, list[str]]:
    """``--direction HOOK=PATH`` (repeatable; several files at one hook are all loaded)."""
    directions: dict[str, list[str]] = {}
    for spec in specs:
        hook, sep, path = spec.partition("=")
        if not sep or not hook or not path:
            raise ConfigError(f"--direction {spec!r}: expected HOOK=PATH, "
                             "e.g. --direction model.layers.12=refusal.safetensors")
        directions.setdefault(hook, []).append(path)
    return directions


def model_pair_args(p: argparse.ArgumentParser, base_use: str) -> None:
    """--model/--adapter/--base-model: a fine-tuned model and its base, as ``loading.load_pair`` takes them."""
    p.add_argument("--model", required=True, help="the fine-tuned model folder, or with --adapter the base model")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder loaded onto --model (base = adapter off)")
    p.add_argument("--base-model", default=None, help=f"the base model folder ({base_use})")


def run_args(p: argparse.ArgumentParser, what: str) -> None:
    """--device, --dtype, --json, --trust-remote-code, --no-progress of the offline model commands."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, metavar="FILE", help=f"also write {what} as JSON")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def write_json(path: str, data: object) -> None:
    """``--json FILE``: the results as JSON, or one line naming the option when it cannot be written."""
    import json
    from pathlib import Path

    try:
        Path(path).write_text(json.dumps(data, indent=2))
    except OSError as e:
        raise ConfigError(f"--json {path}: cannot write it ({e.strerror or e}); give a writable file path") from None
