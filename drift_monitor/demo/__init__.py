"""Demo and test builders: the model organism (``organism``), tiny models and SAEs (``tiny``),
the SmolLM2 real-model test bed (``testbed``) and the benchmark (``bench``). The core never
imports this package; the CLI and the tests do."""
