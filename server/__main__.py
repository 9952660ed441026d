"""`python -m server` = `pi-server`."""

import sys

from server.app import cli

if __name__ == "__main__":
    sys.exit(cli())
