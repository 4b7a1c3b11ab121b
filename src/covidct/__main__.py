"""``python -m covidct``: the same command line as the ``covidct`` script."""

from covidct.cli import main

main()
