"""Run a grid file: ``python -m ablations ablations/digits.toml [infocnf ablate options]``."""

import sys

from infocnf.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
