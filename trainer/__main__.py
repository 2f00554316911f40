"""`python -m trainer ...` (and `torchrun -m trainer ...`): the same as `qlp train ...`."""

from trainer.cli import main

raise SystemExit(main())
