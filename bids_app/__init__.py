"""DeepISLES as a BIDS App: command line, discovery, workflow, derivatives and reports."""

__version__ = "0.1.0"
APP_NAME = "deepisles-bids"
COMMAND = "deepisles"  # the console script (pyproject.toml) and the images' entry point

import os as _os

# Nothing the app does may reach the network: nipype's version check is off before nipype loads.
_os.environ.setdefault("NIPYPE_NO_ET", "1")
