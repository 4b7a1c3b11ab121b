"""DVC stage entry point; the work is in covidct.stages.register_model."""

from covidct.stages import main
from covidct.stages.register_model import run

if __name__ == "__main__":
    main(run)
