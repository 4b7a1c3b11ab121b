"""DVC stage entry point; the work is in covidct.stages.train_lesion."""

from covidct.stages import main
from covidct.stages.train_lesion import run

if __name__ == "__main__":
    main(run)
