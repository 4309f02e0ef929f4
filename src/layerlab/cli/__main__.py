"""`python -m layerlab.cli` runs the CLI (used by tests that kill a running command)."""
from . import main

main()
