"""The rollout report: per tier, agent and arm, quality (feedback), latency, cost and savings (docs/rollout.md)."""
