"""Exporters that take plain records (Snapshot, Alert), never models."""
