"""`python -m distft.plan [overrides]` (distft/plan/report.py, main)."""

import sys

from distft.plan.report import main

sys.exit(main())
