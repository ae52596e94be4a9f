"""`python -m batuta`: the `batuta` command (hosts start their agent as `python -m batuta agent`)."""

from __future__ import annotations

import sys

from batuta._entry import main

if __name__ == "__main__":
    sys.exit(main())
