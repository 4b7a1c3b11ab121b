"""DVC stage entry point; the work is in covidct.stages.train_classifier."""

import argparse
from functools import partial

from covidct.paths import VARIANTS
from covidct.stages import main
from covidct.stages.train_classifier import run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Train the classifier on cropped (with segmentation) or raw (without) images."
    )
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    main(partial(run, variant=parser.parse_args().variant))
