"""`python -m cftune …` (also what `accelerate launch -m cftune …` runs)."""

import sys

from cftune.cli import main

sys.exit(main())
