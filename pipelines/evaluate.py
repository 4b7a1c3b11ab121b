"""DVC stage entry point; the work is in covidct.stages.evaluate."""

from covidct.stages import main
from covidct.stages.evaluate import run

if __name__ == "__main__":
    main(run)
