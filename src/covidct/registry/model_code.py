"""The file MLflow stores as the model's code ("models from code"): loading the model runs this
short, reviewed file instead of unpickling a Python object from the model directory."""

from mlflow.models import set_model

from covidct.registry.pipeline_model import PipelineModel

set_model(PipelineModel())
