"""`python -m lincompile ...`: the same as the `lincompile` console script."""
import sys

from lincompile.cli.main import main

sys.exit(main())
