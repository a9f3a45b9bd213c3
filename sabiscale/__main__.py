"""`python -m sabiscale` (and `deepspeed --module sabiscale`): the console script, sabiscale/cli.py."""
import sys

from sabiscale.cli import main

if __name__ == "__main__":
    sys.exit(main())
