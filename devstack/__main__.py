"""Run the local stack command line: ``python -m devstack up|status|down|topics``."""

import sys

from devstack.cli import main

sys.exit(main())
