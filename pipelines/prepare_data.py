"""DVC stage entry point; the work is in covidct.stages.prepare_data."""

from covidct.stages import main
from covidct.stages.prepare_data import run

if __name__ == "__main__":
    main(run)
