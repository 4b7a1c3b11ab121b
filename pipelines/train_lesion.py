"""DVC stage entry point; the work is in covidct.stages.train_segmenter (the lesion net)."""

from functools import partial

from covidct.stages import main
from covidct.stages.train_segmenter import run

if __name__ == "__main__":
    main(partial(run, net="lesion"))
