from __future__ import annotations

import pytest
import torch

from models import build_zoo_model
from search.engine import accuracy, predict


@pytest.mark.parametrize("name", ["tiny_vgg", "tiny_resnet"])
def test_predict_gives_the_models_own_logits_for_every_image(name: str) -> None:
    """Scoring runs in channels_last batches of 64: it must still return each image's logits, in order,
    as a plain contiguous tensor, including a last partial batch, and leave the images as they were."""
    model, shape = build_zoo_model(name)
    images = torch.randn(150, *shape, generator=torch.Generator().manual_seed(0))
    before = images.clone()
    with torch.no_grad():
        expected = model.eval()(images)
    got = predict(model, images)
    assert got.shape == expected.shape and got.is_contiguous()
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(images, before) and images.is_contiguous()
    labels = expected.argmax(1)
    assert accuracy(model, images, labels) == 100.0
    assert accuracy(model, images, (labels + 1) % expected.shape[1]) == 0.0
