"""`python -m secure.measure` and `secure.measure` keep working: the module is `secure.tools.measure`."""

import sys

from secure.tools.measure import *  # noqa: F401,F403
from secure.tools.measure import main

if __name__ == "__main__":
    sys.exit(main())
