"""`python -m secure.netns` and `secure.netns` keep working: the module is `secure.tools.netns`."""

import sys

from secure.tools.netns import *  # noqa: F401,F403
from secure.tools.netns import main

if __name__ == "__main__":
    sys.exit(main())
