"""A saved pixclass model as an MLflow pyfunc model, logged "from code" (this file travels with the
MLflow model and is run when it is loaded; no pickle): `mlflow.pyfunc.load_model(uri)` gives a model
whose `predict` takes image paths (a list of paths, or a one-column DataFrame of them) and returns
the predicted class name of each, in order. The model folder itself is the MLflow model's
artifact "model_dir"; predictions go through pixclass's own Predictor, so they are what
`pixclass predict` gives. Imported only where mlflow already is (the MLflow tracker, MLflow
loading the model): it imports mlflow at the top."""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

MODEL_DIR_ARTIFACT = "model_dir"
BATCH = 64  # images decoded and run at once: memory stays flat however many paths are given


class PixclassModel(PythonModel):
    def load_context(self, context) -> None:
        from pixclass.predict import Predictor  # absolute: MLflow runs this file outside the package
        self.predictor = Predictor.load(context.artifacts[MODEL_DIR_ARTIFACT])

    def predict(self, model_input: list[str], params=None) -> list[str]:
        """The class name of each image path, in order (MLflow turns a one-column DataFrame into
        this list, from the type hints)."""
        classes = self.predictor.classes
        names = []
        for start in range(0, len(model_input), BATCH):
            probs = self.predictor.probabilities(list(model_input[start:start + BATCH]))
            names += [classes[i] for i in probs.argmax(1).tolist()]
        return names


mlflow.models.set_model(PixclassModel())
