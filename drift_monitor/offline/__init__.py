"""After the run: scan saved checkpoints, verify flagged features causally, load models safely."""
