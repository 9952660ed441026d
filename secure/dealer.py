"""`python -m secure.dealer` and `secure.dealer` keep working: the module is `secure.control.dealer`."""

import sys

from secure.control.dealer import *  # noqa: F401,F403
from secure.control.dealer import cli

if __name__ == "__main__":
    sys.exit(cli())
