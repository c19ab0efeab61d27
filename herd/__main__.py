"""`python -m herd ...` (also what `torchrun -m herd` runs): the same as the `herd` command."""
from herd.cli import main

raise SystemExit(main())
