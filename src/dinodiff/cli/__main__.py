"""`python -m dinodiff.cli`, also what `accelerate launch -m dinodiff.cli` runs."""

import sys

from dinodiff.cli import main

sys.exit(main())
