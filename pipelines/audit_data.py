"""DVC stage entry point; the work is in covidct.stages.audit_data."""

from covidct.stages import main
from covidct.stages.audit_data import run

if __name__ == "__main__":
    main(run)
