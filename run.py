#!/usr/bin/env python3
"""BIDS-App entry point: ``run.py bids_dir output_dir {participant,group} [options]``."""

import sys

from bids_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
