"""The probe pass: from a model and its base SAE to streaming statistics and metrics.

``probes`` formats and tokenises the probe set (``tokens``: which positions are read),
``capture`` hooks the layers for one forward, ``saes`` loads the SAEs, ``stats`` accumulates
per-category sums that merge across batches and ranks, ``compare`` and ``metrics`` turn the
current and base sums into the metrics of docs/metrics.md, ``directions`` and ``adapters`` add
direction projections and LoRA signals. Everything here may import torch; nothing here writes.
"""
