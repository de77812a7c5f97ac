"""`python -m distft.data [overrides]`: the `distft data` command (distft/commands/data.py)."""

import sys

from distft.commands.data import main

sys.exit(main())
