import pytest

from pixclass.config import AugmentConfig, DataConfig, RunConfig, TrainConfig
from pixclass.errors import ConfigError


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig().replace("train", epochs=3, lr=0.01).replace("augment", rotation=5.0)
    cfg.save_yaml(tmp_path / "c.yaml")
    assert RunConfig.load_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(epochs=-1), "epochs"),
    (lambda: TrainConfig(lr=-1), "lr"),
    (lambda: TrainConfig(optimizer="rmsprop"), "optimizer"),
    (lambda: TrainConfig(schedule="wiggle"), "schedule"),
    (lambda: DataConfig(channels=2), "channels"),
    (lambda: DataConfig(split=(0.5, 0.2, 0.2)), "split"),
    (lambda: AugmentConfig(policy="heavy"), "augment"),
    (lambda: AugmentConfig(zoom=1.5), "zoom"),
])
def test_bad_values_name_the_field(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_unknown_keys_and_wrong_types_in_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="epochz"):
        RunConfig.load_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train"):
        RunConfig.load_yaml(tmp_path / "b.yaml")
