"""`python -m distft.plan [overrides]`: the `distft plan` command (distft/commands/plan.py)."""

import sys

from distft.commands.plan import main

sys.exit(main())
