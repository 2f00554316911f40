"""Framework routes (everything but the proxy hot path): models, health, readiness."""
