"""`python -m secure.auth` and `secure.auth` keep working: the module is `secure.control.auth`."""

import sys

from secure.control.auth import *  # noqa: F401,F403
from secure.control.auth import main

if __name__ == "__main__":
    sys.exit(main())
