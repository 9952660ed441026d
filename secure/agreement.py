"""`python -m secure.agreement` and `secure.agreement` keep working: the module is `secure.tools.agreement`."""

import sys

from secure.tools.agreement import *  # noqa: F401,F403
from secure.tools.agreement import main

if __name__ == "__main__":
    sys.exit(main())
