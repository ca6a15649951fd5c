"""`python -m expertd.daemon` runs the `expertd` command line."""

import sys

from expertd.daemon.cli.main import main

sys.exit(main())
