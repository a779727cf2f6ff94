from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtier.data import load_dataset
from fedtier.errors import FedtierError
from fedtier.generative import cache_dir, dataset_judge, resize_images, to_pm1, train_judge


@pytest.fixture(scope="module")
def digits():
    train, test = load_dataset("digits")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))  # mix classes
    return to_pm1(train.x, train)[order], train.y[order], to_pm1(test.x, train), test.y


def test_to_pm1_undoes_mnist_standardisation():
    train, _ = load_dataset("mnist5k")
    x = to_pm1(train.x[:50], train)
    pixel = train.x[:50] * 0.3081 + 0.1307  # back to [0, 1]
    assert torch.allclose(x, pixel * 2 - 1, atol=1e-5)


def test_real_judge_learns_mnist_subset():
    train, test = load_dataset("mnist5k")
    x = to_pm1(train.x[::3], train)  # the training split is sorted by class: take every third
    judge = train_judge(x, train.y[::3], seed=0, num_classes=10, epochs=4)
    assert judge.accuracy(to_pm1(test.x, train), test.y) >= 0.9
    assert judge.features(x[:7]).shape == (7, 128)


@pytest.mark.parametrize("size", [8, 16])
def test_small_images_and_probabilities(digits, size):
    x, y, _, _ = digits
    x = torch.nn.functional.interpolate(x[:200], size=(size, size), mode="bilinear")
    judge = train_judge(x, y[:200], seed=1, num_classes=10, epochs=1)
    p = judge.probs(x[:5])
    assert p.shape == (5, 10)
    assert torch.allclose(p.sum(1), torch.ones(5), atol=1e-6)
    assert torch.allclose(p, torch.softmax(judge.net(x[:5]), 1), atol=1e-6)
    assert judge.features(x[:5]).shape == (5, judge.num_features)
    with pytest.raises(FedtierError, match="expects"):
        judge.probs(torch.zeros(5, 1, size + 1, size + 1))


def test_deterministic_and_seed_dependent(digits):
    x, y, _, _ = digits
    a = train_judge(x[:128], y[:128], seed=3, num_classes=10, epochs=1, use_cache=False)
    b = train_judge(x[:128], y[:128], seed=3, num_classes=10, epochs=1, use_cache=False)
    c = train_judge(x[:128], y[:128], seed=4, num_classes=10, epochs=1, use_cache=False)
    assert torch.equal(a.logits(x[:20]), b.logits(x[:20]))
    assert not torch.equal(a.logits(x[:20]), c.logits(x[:20]))


def test_leaves_the_global_rng_alone(digits):
    x, y, _, _ = digits
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    train_judge(x[:64], y[:64], seed=0, num_classes=10, epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_cache_reuse_and_corrupt_file_rebuilt(digits):
    x, y, _, _ = digits
    first = train_judge(x[:128], y[:128], seed=0, num_classes=10, epochs=1)
    assert not first.cached
    files = list(cache_dir().glob("*.pt"))
    assert [f.stem for f in files] == [first.key]
    again = train_judge(x[:128], y[:128], seed=0, num_classes=10, epochs=1)
    assert again.cached and torch.equal(again.logits(x), first.logits(x))
    # other data, labels or settings: another key
    assert train_judge(x[:128], y[:128], seed=0, num_classes=10, epochs=2).key != first.key
    labels = y[:128].clone()
    labels[0] = (labels[0] + 1) % 10
    assert train_judge(x[:128], labels, seed=0, num_classes=10, epochs=1).key != first.key
    files[0].write_bytes(b"not a checkpoint")
    rebuilt = train_judge(x[:128], y[:128], seed=0, num_classes=10, epochs=1)
    assert not rebuilt.cached and torch.equal(rebuilt.logits(x), first.logits(x))
    assert train_judge(x[:128], y[:128], seed=0, num_classes=10, epochs=1).cached


def test_bad_inputs_are_user_errors(digits):
    x, y, _, _ = digits
    with pytest.raises(FedtierError, match=r"\[-1, 1\]"):
        train_judge(x[:10] * 3, y[:10], seed=0, num_classes=10)
    with pytest.raises(FedtierError, match="0..4"):
        train_judge(x[:10], y[:10] + 5, seed=0, num_classes=5)
    with pytest.raises(FedtierError, match=r"\[N\]"):
        train_judge(x[:10], y[:9], seed=0, num_classes=10)
    with pytest.raises(FedtierError, match="float tensor"):
        train_judge(x[:10, 0], y[:10], seed=0, num_classes=10)


def test_resize_matches_pillows_antialiased_bilinear():
    from PIL import Image

    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for size in (16, 14, 8):
        got = resize_images(x, size)
        for i in range(3):
            img = Image.fromarray(x[i, 0].numpy(), mode="F").resize((size, size), Image.BILINEAR)
            np.testing.assert_allclose(got[i, 0].numpy(), np.asarray(img), atol=1e-4)
    assert resize_images(x, 28) is x
    with pytest.raises(FedtierError, match="size"):
        resize_images(x, 2)


def test_source_judge_of_the_multisource_set():
    train, test = load_dataset("multisource-mnist")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:600]
    judge = dataset_judge(train.subset(pick), by="source", size=8, epochs=4)
    assert judge.num_classes == 3 and judge.input_shape == (1, 8, 8)
    x_test = resize_images(to_pm1(test.x, train), 8)
    assert judge.accuracy(x_test, test.source) >= 0.9
    for s in range(3):  # every source recognised, not just the two large ones
        mine = test.source == s
        assert judge.accuracy(x_test[mine], test.source[mine]) >= 0.8
    digit_judge = dataset_judge(train.subset(pick), by="class", size=8, epochs=1)
    assert digit_judge.num_classes == 10 and digit_judge.key != judge.key
    mnist, _ = load_dataset("mnist5k")
    with pytest.raises(FedtierError, match="no sources"):
        dataset_judge(mnist, by="source")
    with pytest.raises(FedtierError, match="'class' or 'source'"):
        dataset_judge(mnist, by="label")


def test_unwritable_cache_warns_and_still_returns_the_judge(digits, tmp_path, monkeypatch):
    x, y, _, _ = digits
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FEDTIER_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="not cached"):
        judge = train_judge(x[:64], y[:64], seed=0, num_classes=10, epochs=1)
    assert not judge.cached and judge.probs(x[:3]).shape == (3, 10)
