"""`python -m medmim` (and `torchrun -m medmim`) run the CLI."""

from medmim.cli import main

main()
