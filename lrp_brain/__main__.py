"""``python -m lrp_brain`` (and ``torchrun -m lrp_brain``) runs the command line."""
from lrp_brain.cli import main

main()
