"""Feedback: outcomes of requests and workflows, posted by the orchestrator (docs/rollout.md)."""
