"""`python -m client` = `pi-client`."""

import sys

from client.app import cli

if __name__ == "__main__":
    sys.exit(cli())
