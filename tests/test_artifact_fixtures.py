"""Artifacts saved by earlier pixclass code (tests/fixtures/artifacts-6de4714: the classic CNN under
its old name seed-cnn, the airbench network, a pretrained-backbone transfer model and a plain timm
model) load with today's code and give the probabilities they gave then."""

import json
from pathlib import Path

import numpy as np
import pytest

from pixclass import artifact
from pixclass.predict import Predictor

FIXTURES = Path(__file__).parent / "fixtures" / "artifacts-6de4714"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED["probabilities"]))
def test_an_earlier_artifact_predicts_what_it_predicted_then(name):
    expected = np.asarray(EXPECTED["probabilities"][name])
    assert expected.max(1).min() > 0.4  # confident enough that a changed network would show
    predictor = Predictor.load(FIXTURES / name)
    got = predictor.probabilities([FIXTURES / image for image in EXPECTED["images"]])
    assert predictor.classes == EXPECTED["classes"]
    assert np.abs(got - expected).max() <= 1e-5, np.abs(got - expected).max()


def test_the_old_classic_cnn_name_still_loads():
    art = artifact.load(FIXTURES / "seed-cnn")
    assert art.arch["name"] == "seed-cnn" and type(art.model).__name__ == "ClassicCNN"
