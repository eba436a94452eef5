"""Data: digits split and augmentation, seeded per-sample randomness, samplers, image folders."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pyengine.train.data import (DIGITS_MEAN, DIGITS_STD, Digits, EpochSampler, SeededDataset,
                           ShardSampler, datasets, digits, image_folder, loaders, num_classes)


def test_digits_split_is_stratified_disjoint_and_normalised():
    tr, va = digits("train", img_size=16), digits("val", img_size=16)
    assert len(tr) + len(va) == 1797
    (xt, yt), (xv, yv) = tr.tensors, va.tensors
    assert xt.shape[1:] == (3, 16, 16) and xt.dtype == torch.float32
    assert torch.equal(xt[:, 0], xt[:, 2])  # grey repeated over 3 channels
    counts_v = torch.bincount(yv, minlength=10)
    counts_all = counts_v + torch.bincount(yt, minlength=10)
    assert torch.equal(counts_v, counts_all // 5)  # 20% of every class
    # no validation image equals a training image (exact duplicates aside: compare sums)
    assert not set(xv.flatten(1).sum(1).tolist()) <= set(xt.flatten(1).sum(1).tolist())
    raw = xt * DIGITS_STD + DIGITS_MEAN
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    assert torch.equal(digits("val", img_size=16).tensors[0], xv)  # fixed split
    assert not torch.equal(digits("val", img_size=16, seed=1).tensors[1], yv)
    assert num_classes(tr) == 10
    with pytest.raises(ValueError, match="split"):
        digits("test")
    with pytest.raises(ValueError, match="img_size"):
        digits("train", img_size=4)


def test_digits_augmentation_is_a_small_affine_map():
    base = digits("train", img_size=32)
    aug = digits("train", img_size=32, augment=True)
    assert not digits("val", augment=True).augment  # never on validation
    x0 = base.tensors[0][:64]
    # identity parameters (u = 0.5 everywhere -> no rotation, shift, shear; scale 1)
    ident = Digits(x0, base.tensors[1][:64], augment=True, scale=(0.9, 1.1))
    u = torch.full((64, 5), 0.5, dtype=torch.float64)
    assert torch.allclose(ident._affine(x0, u), x0, atol=1e-5)
    # a pure shift by one 8x8 source pixel (4 of 32) moves the image by 4 pixels
    shift = Digits(x0, base.tensors[1][:64], augment=True, max_shift=0.125)
    u_shift = u.clone()
    u_shift[:, 3] = 1.0  # tx = +2 * 0.125 grid units = 4 pixels: output(x) = input(x + 4)
    moved = shift._affine(x0, u_shift)
    assert torch.allclose(moved[..., :-4], x0[..., 4:], atol=1e-5)
    bg = (0 - DIGITS_MEAN) / DIGITS_STD
    assert torch.allclose(moved[..., -4:], torch.full_like(moved[..., -4:], bg), atol=1e-5)
    # random draws: different from the input, same pixel range, no flips (mass stays put)
    items = aug.getitems_seeded(range(64), 0, 0)
    xa = torch.stack([x for x, _ in items])
    assert not torch.allclose(xa, x0)
    assert xa.min() >= x0.min() - 1e-4 and xa.max() <= x0.max() + 1e-4
    cols = torch.arange(32.0)
    w0, wa = (x0[:, 0] - bg).sum((1,)), (xa[:, 0] - bg).sum((1,))
    cx0, cxa = (w0 * cols).sum(1) / w0.sum(1), (wa * cols).sum(1) / wa.sum(1)
    assert (cx0 - cxa).abs().max() < 6.0  # a mirror would move most digits' mass much more
    assert torch.equal(torch.stack([y for _, y in items]), base.tensors[1][:64])


def test_seeded_dataset_is_reproducible_and_leaves_rng_alone():
    aug = digits("train", img_size=16, augment=True)

    class Noisy(torch.utils.data.Dataset):  # a transform drawing from every global RNG
        def __len__(self):
            return 10

        def __getitem__(self, i):
            import random
            return torch.rand(2), random.random(), np.random.rand()

    for ds in (aug, Noisy()):
        a = SeededDataset(ds, seed=3, epoch=1)
        torch.manual_seed(5)
        first = [a[i] for i in range(4)]
        after = torch.rand(3)
        torch.manual_seed(5)
        assert torch.equal(torch.rand(3), after)  # fetching consumed no global randomness
        again = [a[i] for i in (3, 2, 1, 0)][::-1]
        for u, v in zip(first, again):
            assert str(u) == str(v)  # same sample whatever the order
        other = SeededDataset(ds, seed=3, epoch=2)
        assert str(other[0]) != str(first[0])  # new epoch, new draw
    batched = SeededDataset(aug, 3, 1).__getitems__([0, 1])
    assert torch.equal(batched[1][0], SeededDataset(aug, 3, 1)[1][0])


def test_epoch_sampler_matches_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler
    ds = list(range(40))
    s = EpochSampler(40, seed=7)
    r0 = DistributedSampler(ds, num_replicas=2, rank=0, seed=7)
    r1 = DistributedSampler(ds, num_replicas=2, rank=1, seed=7)
    for epoch in (0, 3):
        for x in (s, r0, r1):
            x.set_epoch(epoch)
        order, a, b = list(s), list(r0), list(r1)
        assert sorted(order) == ds
        for k in range(0, 20, 4):  # single batch 2b == union of the two ranks' batches of b
            assert sorted(order[2 * k:2 * k + 8]) == sorted(a[k:k + 4] + b[k:k + 4])
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]
    shards = [list(ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11)) and len(ShardSampler(11, 2, 3)) == 3


def make_png_folder(root, classes=("cat", "dog"), per_split=(5, 3), size=20):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_split):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)
                arr[..., c] = 255  # classes differ by colour
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_image_folder_through_timm(tmp_path):
    root = make_png_folder(tmp_path / "imgs")
    tr, va, n = datasets(str(root), img_size=16, augment=True)
    assert n == 2 and num_classes(va) == 2 and len(tr) == 10 and len(va) == 6
    x, y = va[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y in (0, 1)
    train, val, n = loaders(str(root), img_size=16, batch_size=4, augment=True)
    xb, yb = next(iter(train))
    assert xb.shape == (4, 3, 16, 16) and yb.dtype == torch.int64
    labels = torch.cat([y for _, y in val])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # red channel (class 0 = "cat") is saturated: after ImageNet normalisation it is the max
    xv, yv = next(iter(DataLoader(va, batch_size=6)))
    red_is_max = xv[:, 0].mean((1, 2)) > xv[:, 1].mean((1, 2))
    assert torch.equal(red_is_max, yv == 0)
    # seeded timm augmentation: same (seed, epoch, index) -> same crop and flip
    s = SeededDataset(tr, seed=1, epoch=0)
    assert torch.equal(s[3][0], s[3][0])
    assert not torch.equal(s[3][0], SeededDataset(tr, seed=1, epoch=1)[3][0])
    with pytest.raises(FileNotFoundError, match="ImageNet layout"):
        image_folder(tmp_path / "nope", "train")
    with pytest.raises(ValueError, match="split"):
        image_folder(root, "test")


def test_loaders_digits_and_errors():
    train, val, n = loaders("digits", img_size=16, batch_size=100, augment=True)
    assert n == 10 and train.drop_last and len(train) == 1442 // 100
    assert isinstance(train.sampler, EpochSampler) and train.dataset.augment
    assert not val.dataset.augment and len(val.dataset) == 355
    with pytest.raises(ValueError, match="batch_size"):
        loaders("digits", batch_size=0)
    with pytest.raises(ValueError, match="number of classes"):
        num_classes([1, 2, 3])
