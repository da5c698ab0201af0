import pytest
import torch
from torch import nn

from pixclass.errors import ConfigError, UserError
from pixclass.models.registry import build_model, create_model
from pixclass.models.summary import model_summary


def test_classic_cnn_is_the_keras_tutorial_network():
    model, arch = create_model("classic-cnn", num_classes=10, in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3)), (128, (3, 3))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(128 * 2 * 2, 256), (256, 10)]
    # the Keras model.summary() of this network at 32x32x3 has 227,146 parameters
    assert sum(p.numel() for p in model.parameters()) == 227_146
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert arch["name"] == "classic-cnn"


def test_seed_cnn_is_an_alias_that_old_artifacts_and_configs_keep_using():
    from pixclass.models.registry import family_for, family_of
    _, arch = create_model("classic-cnn", 10, 3, 32)
    assert arch["name"] == "classic-cnn"
    assert family_for("seed-cnn") is family_for("classic-cnn") is family_of({"name": "seed-cnn", "kwargs": {}})
    old = {"name": "seed-cnn", "kwargs": dict(arch["kwargs"])}
    assert sum(p.numel() for p in build_model(old).parameters()) == 227_146


@pytest.mark.parametrize("name, recipe, pretrained", [("classic-cnn", "scratch", False), ("airbench", "fast", False),
                                                      ("efficientnet_lite0", "transfer", True),
                                                      ("resnet18", "scratch", False)])
def test_every_family_says_what_callers_need(name, recipe, pretrained):
    """The registry answers, per family: the recipe, the Grad-CAM layer, what --freeze freezes."""
    from pixclass.models.registry import family_for, family_of
    family = family_for(name)
    model, arch = create_model(name, 3, 3, 64)
    assert family_of(arch) is family and family.default_recipe(name) == recipe
    layer = family.gradcam_layer(model)
    assert any(layer is m for m in model.modules())
    assert (family.frozen_part(model) is not None) == pretrained == family.weights_decide_preprocessing


def test_classic_cnn_at_224_and_options():
    model, _ = create_model("classic-cnn", 5, 1, 224)
    assert model(torch.zeros(1, 1, 224, 224)).shape == (1, 5)
    from pixclass.config import ModelConfig
    model, arch = create_model("classic-cnn", 4, 3, 64, ModelConfig(filters=(8, 16), dense=32, dropout=0.5, padding="same"))
    assert arch["kwargs"]["filters"] == [8, 16] and model(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())


def test_too_small_image_is_a_config_error():
    with pytest.raises(ConfigError, match="too small"):
        create_model("classic-cnn", 10, 3, 16)


def test_timm_architecture_gets_a_new_head_and_rebuilds():
    model, arch = create_model("resnet18", num_classes=3, in_channels=1, image_size=64)
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 3)
    again = build_model(arch)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'resnet_nonexistent'"):
        create_model("resnet_nonexistent", 3)


def test_summary_lists_layers_and_counts():
    model, _ = create_model("classic-cnn", 10, 3, 32)
    text = model_summary(model, 3, 32)
    assert "Conv2d" in text and "[1, 32, 30, 30]" in text and "227,146" in text
