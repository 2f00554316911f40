"""Gradual rollouts: weighted, workflow-sticky arms per tier and agent, changed at run time, and shadow
traffic (docs/rollout.md)."""
