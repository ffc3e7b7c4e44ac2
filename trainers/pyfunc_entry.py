"""The model file of the logged MLflow model ("models from code"): MLflow runs this file when it
loads the model, and the model is what `set_model` names. The project's code travels with the model
in its `code_paths` (itmatch/, trainers/), so this import works without installing the project."""

import mlflow.models

from trainers.pyfunc_model import EmbeddingModel

mlflow.models.set_model(EmbeddingModel())
