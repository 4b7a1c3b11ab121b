"""covidct: two-stage COVID-19 diagnosis from chest CT slices (Tran et al.), reproducible with DVC and MLflow."""
