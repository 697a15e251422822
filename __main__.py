"""`python -m lpc ...` is the same as the `lpc` command."""
from lpc.cli.main import main

main()
