"""`python -m unsupft` is the same as the `unsupft` console script."""

from unsupft.cli import main

main()
