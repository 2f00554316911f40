"""The base model the fleet serves and trains on: `qlp prepare-model` builds models/base (prepare.py)."""
