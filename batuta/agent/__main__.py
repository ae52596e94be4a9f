"""`python -m batuta.agent --stdio ...`: run the host agent (see `batuta.agent.main`)."""

from __future__ import annotations

import sys

from batuta.agent.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
