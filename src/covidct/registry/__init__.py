"""The MLflow Model Registry side: the pipeline as one model, registration, promotion."""
