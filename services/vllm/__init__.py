"""Real vLLM as the local fleet's model server: launch arguments per tier (YAML) and the launcher (launch.py)."""
