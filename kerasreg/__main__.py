"""`python -m kerasreg`: the same command line as the `kerasreg` script."""

import sys

from kerasreg.cli import main

sys.exit(main())
