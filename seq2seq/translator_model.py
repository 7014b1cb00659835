"""The MLflow "models from code" file of the exported translator: stages/export.py logs this file as the
model, and `mlflow.pyfunc.load_model` runs it to get the model object (no pickle). See seq2seq/serving.py."""

from mlflow.models import set_model

from seq2seq.serving import Translator

set_model(Translator())
