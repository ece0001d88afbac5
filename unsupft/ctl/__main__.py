"""`python -m unsupft.ctl` is the same as the `unsupft-ctl` console script."""

from unsupft.ctl.cli import main

main()
