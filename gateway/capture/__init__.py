"""Capture: opt-in recording of exchanges (redacted) into Redis streams, exported as the trainer's JSONL
(docs/capture.md)."""
