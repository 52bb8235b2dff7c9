"""``--hook auto[:N]``: the documented default for which layers to watch when the user names none
(decoder layers evenly spaced from a third of the depth to the last but one)."""

from __future__ import annotations

import pytest

from drift_monitor.demo.tiny import build_llama
from drift_monitor.probe.capture import HookNotFoundError, auto_hooks, decoder_layers, expand_auto


@pytest.fixture(scope="module")
def deep():
    return build_llama(64, hidden=16, layers=30, seed=0)  # SmolLM2-135M's depth


def test_the_layers_of_a_30_layer_model(deep):
    assert decoder_layers(deep) == [f"model.layers.{i}" for i in range(30)]
    assert auto_hooks(deep) == ["model.layers.10", "model.layers.16", "model.layers.22", "model.layers.28"]
    assert auto_hooks(deep, 1) == ["model.layers.19"]
    assert auto_hooks(deep, 2) == ["model.layers.10", "model.layers.28"]
    assert len(auto_hooks(deep, 40)) == 19  # never more than the layers in the range, never repeated


def test_expand_keeps_named_hooks_and_drops_repeats(deep):
    assert expand_auto(deep, ["model.layers.3", "auto:2", "model.layers.10"]) == \
        ["model.layers.3", "model.layers.10", "model.layers.28"]
    for bad in ("auto:0", "auto:x", "auto:"):
        if bad == "auto:":
            assert expand_auto(deep, [bad]) == auto_hooks(deep)
            continue
        with pytest.raises(HookNotFoundError, match="auto:N"):
            expand_auto(deep, [bad])


def test_wrappers_and_shallow_models():
    from peft import LoraConfig, get_peft_model

    small = build_llama(64, hidden=16, layers=2, seed=0)
    assert auto_hooks(small) == ["model.layers.0"]
    wrapped = get_peft_model(build_llama(64, hidden=16, layers=6, seed=0),
                             LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert auto_hooks(wrapped, 2) == ["model.layers.2", "model.layers.4"]  # PEFT's prefix normalised away
    with pytest.raises(HookNotFoundError, match="name the hooks yourself"):
        decoder_layers(__import__("torch").nn.Linear(2, 2))
