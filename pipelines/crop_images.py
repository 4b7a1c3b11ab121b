"""DVC stage entry point; the work is in covidct.stages.crop_images."""

from covidct.stages import main
from covidct.stages.crop_images import run

if __name__ == "__main__":
    main(run)
