"""`python -m runner` runs the voxtral-run command."""

from voxtral_run.runner.cli import main

main()
