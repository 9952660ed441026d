"""`python -m secure.netmodel` and `secure.netmodel` keep working: the module is `secure.tools.netmodel`."""

import sys

from secure.tools.netmodel import *  # noqa: F401,F403
from secure.tools.netmodel import main

if __name__ == "__main__":
    sys.exit(main())
