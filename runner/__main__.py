"""`python -m runner` runs the voxtral-run command."""

from runner.cli import main

main()
