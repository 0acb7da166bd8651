"""`python -m nanoseek`, the same as the `nanoseek` command; what `torchrun -m nanoseek ...` runs."""

import sys

from nanoseek.cli import main

sys.exit(main())
