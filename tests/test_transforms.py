import torch

from pixclass.config import AugmentConfig
from pixclass.data.transforms import BatchAugment, Preprocess, batch_to_input


def _batch(n=8, size=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_standardization_uses_mean_and_std():
    pre = Preprocess(size=16, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    b = _batch()
    x = batch_to_input(b, pre)
    expected = (b.float() / 255 - torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_augmentation_is_seeded_changes_images_and_keeps_range():
    aug = BatchAugment(AugmentConfig())
    x = _batch().float() / 255
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, x)


def test_zero_strength_augmentation_is_identity_and_flip_mirrors():
    still = AugmentConfig(rotation=0, width_shift=0, height_shift=0, shear=0, zoom=0, brightness=0, contrast=0,
                          horizontal_flip=False)
    x = _batch().float() / 255
    assert torch.allclose(BatchAugment(still)(x, torch.Generator().manual_seed(0)), x, atol=1e-5)
    import dataclasses
    flips = BatchAugment(dataclasses.replace(still, horizontal_flip=True))(x, torch.Generator().manual_seed(0))
    for i in range(len(x)):
        assert torch.allclose(flips[i], x[i], atol=1e-5) or torch.allclose(flips[i], x[i].flip(-1), atol=1e-5)


def test_shift_moves_content():
    cfg = AugmentConfig(rotation=0, width_shift=0.25, height_shift=0, shear=0, zoom=0, brightness=0, contrast=0,
                        horizontal_flip=False, fill="constant")
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, :, 6:10] = 1.0  # a vertical bar in the middle
    out = BatchAugment(cfg)(x, torch.Generator().manual_seed(3))
    centres = (out[:, 0].sum(1) * torch.arange(16)).sum(1) / out[:, 0].sum(1).sum(1)
    assert centres.std() > 0.5  # the bar lands at different columns
