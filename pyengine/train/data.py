"""Data: the embedded default (scikit-learn's handwritten digits) and image folders via timm.

``digits`` is real data that needs no download: 1,797 8x8 grey images of 10 digits, upscaled
to ``img_size`` and repeated over 3 channels, split 80/20 per class with a fixed seed. Its
optional training augmentation is a small random affine map (shift, rotation, scale, shear;
never a flip: a mirrored 2 is not a 2).
An image folder in ImageNet layout (``DIR/train/<class>/*``, ``DIR/val/<class>/*``) goes
through timm's dataset and transform pipeline.

Randomness is reproducible per sample: :class:`SeededDataset` seeds every ``__getitem__`` from
``(seed, epoch, index)``, so augmentations do not depend on worker count, on what ran before,
or on whether training was resumed in the middle of an epoch.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

DIGITS_MEAN, DIGITS_STD = 0.3, 0.4  # of pixel/16 over the whole set, rounded
DIGITS_CLASSES = 10


class Digits(TensorDataset):
    """``digits`` as ``(x, y)`` tensors; with ``augment`` each item gets a random affine map.

    ``tensors`` hold the normalised, un-augmented images ``[N, 3, S, S]`` and labels ``[N]``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, augment: bool = False,
                 max_shift: float = 0.12, max_rotate: float = 12.0, scale: tuple = (0.9, 1.1),
                 max_shear: float = 8.0):
        super().__init__(x, y)
        self.augment = augment
        self.max_shift, self.max_rotate, self.scale, self.max_shear = (
            max_shift, max_rotate, scale, max_shear)
        self._background = (0.0 - DIGITS_MEAN) / DIGITS_STD

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        return self.getitems_seeded(indices, None, 0)

    def getitems_seeded(self, indices, seed: int | None, epoch: int) -> list:
        """Samples ``indices`` at once; augmentation drawn from ``(seed, epoch, index)``
        (torch's global RNG when ``seed`` is None). Batched: one grid_sample per batch."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x, y = self.tensors[0][idx], self.tensors[1][idx]
        if self.augment and len(idx):
            if seed is None:
                u = torch.rand(len(idx), 5, dtype=torch.float64)
            else:
                u = torch.from_numpy(np.stack([np.random.default_rng([seed, epoch, int(i)])
                                               .random(5) for i in idx.tolist()]))
            x = self._affine(x, u)
        return list(zip(x.unbind(0), y.unbind(0)))

    def _affine(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Random affine maps of a batch ``x`` [B, C, S, S] from uniforms ``u`` [B, 5]."""
        rot = torch.deg2rad((2 * u[:, 0] - 1) * self.max_rotate)
        shear = torch.tan(torch.deg2rad((2 * u[:, 1] - 1) * self.max_shear))
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 2]
        tx, ty = ((2 * u[:, 3:] - 1) * 2 * self.max_shift).unbind(1)  # grid coords span 2
        c, sn = torch.cos(rot), torch.sin(rot)
        # rotation @ shear, divided by the scale (the grid maps output to input coordinates)
        theta = torch.stack([torch.stack([c, c * shear - sn, tx * s], 1),
                             torch.stack([sn, sn * shear + c, ty * s], 1)], 1) / s[:, None, None]
        grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], 1, *x.shape[2:]],
                             align_corners=False)
        bg = self._background
        # the channels are equal copies: warp one, expand
        out = F.grid_sample(x[:, :1] - bg, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False) + bg
        return out.expand_as(x).contiguous()


def digits(split: str = "train", img_size: int = 32, seed: int = 0,
           augment: bool | dict = False) -> Digits:
    """scikit-learn's digits as a dataset of ([3, img_size, img_size] float, label).

    ``augment``: True for the default random affine map on the training split, or a dict of
    :class:`Digits` limits (``max_shift``, ``max_rotate``, ``scale``, ``max_shear``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"digits img_size must be an int >= 8, got {img_size!r}")
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for c in range(DIGITS_CLASSES):  # stratified 20% validation split
        idx = np.flatnonzero(d.target == c)
        val[rng.choice(idx, size=len(idx) // 5, replace=False)] = True
    keep = torch.from_numpy(val if split == "val" else ~val)
    x = F.interpolate(x[keep], size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - DIGITS_MEAN) / DIGITS_STD).expand(-1, 3, -1, -1).contiguous()
    limits = dict(augment) if isinstance(augment, dict) else {}
    unknown = set(limits) - {"max_shift", "max_rotate", "scale", "max_shear"}
    if unknown:
        raise ValueError(f"unknown digits augmentation keys {sorted(unknown)}")
    return Digits(x, y[keep], augment=bool(augment) and split == "train", **limits)


def check_data(data: str) -> None:
    """``data`` is "digits" or a folder with ``train/`` and ``val/`` splits (checked before any
    work; the classes are checked when the datasets are read, see :func:`datasets`)."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"data must be 'digits' or an image folder, got {data!r}")
    if data == "digits":
        return
    root = Path(data)
    layout = (f"expected 'digits' or an ImageNet-layout folder {root}/train/<class>/*.jpg and "
              f"{root}/val/<class>/*.jpg")
    if not root.exists():
        raise FileNotFoundError(f"data {root} does not exist; {layout}")
    if not root.is_dir():
        raise NotADirectoryError(f"data {root} is a file; {layout}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} is not a directory; {layout}")


def image_folder(root: str | Path, split: str, img_size: int = 224, augment: bool = True,
                 hflip: float = 0.5, **transform_kwargs) -> Dataset:
    """An ImageNet-layout folder split through timm's ``create_dataset`` and ``create_transform``.

    The training split gets timm's training transform (random resized crop, flip ``hflip``,
    colour jitter) when ``augment``; validation gets resize + centre crop. A split without
    images, images outside class folders, or class folders without images are errors.
    """
    from timm.data import create_dataset, create_transform
    from timm.data.readers.img_extensions import get_img_extensions
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"image folder split must be 'train' or 'val', got {split!r}")
    d = root / split
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory; expected ImageNet layout "
                                f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
    exts = ", ".join(get_img_extensions())
    try:
        ds = create_dataset("", root=str(root), split=split)
    except RuntimeError as e:
        if "Found 0 images" not in str(e):
            raise
        raise ValueError(f"{d} holds no images (timm reads {exts}); expected "
                         f"{d}/<class>/*.jpg") from None
    classes = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    if classes is not None:
        if "" in classes:
            raise ValueError(f"{d} has images outside class folders; put each class's images "
                             f"in {d}/<class>/")
        folders = sorted(p.name for p in d.iterdir() if p.is_dir())
        empty = [f for f in folders if f not in classes]
        if empty and set(classes) <= set(folders):  # classes are the top-level folders
            raise ValueError(f"{d}: class folder(s) {empty[:5]}{'...' if len(empty) > 5 else ''}"
                             f" hold no images (timm reads {exts})")
    training = split == "train" and augment
    kw = dict(transform_kwargs)
    if training:
        kw.setdefault("hflip", hflip)
    ds.transform = create_transform(img_size, is_training=training, **kw)
    return ds


def class_names(ds: Dataset) -> list[str] | None:
    """The class names of a timm image-folder dataset, in label order (None for others)."""
    classes = getattr(getattr(ds, "reader", None), "class_to_idx", None)
    return None if classes is None else sorted(classes, key=classes.get)


def num_classes(ds: Dataset) -> int:
    """Number of classes of a digits / TensorDataset / timm image-folder dataset."""
    ds = getattr(ds, "dataset", ds) if isinstance(ds, SeededDataset) else ds
    if isinstance(ds, Digits):
        return DIGITS_CLASSES
    if isinstance(ds, TensorDataset):
        return int(ds.tensors[1].max()) + 1
    reader = getattr(ds, "reader", None)
    if reader is not None and hasattr(reader, "class_to_idx"):
        return len(reader.class_to_idx)
    raise ValueError(f"cannot tell the number of classes of a {type(ds).__name__}")


def check_splits(root: str | Path, tr: Dataset, va: Dataset) -> None:
    """The two splits have the same classes (else labels shift silently: timm numbers each
    split's folders on its own) and at least two of them."""
    a, b = class_names(tr), class_names(va)
    if a is None or b is None:
        return
    if a != b:
        only_tr, only_va = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"{root}: train and val have different classes (only in train: "
                         f"{only_tr[:5]}{'...' if len(only_tr) > 5 else ''}; only in val: "
                         f"{only_va[:5]}{'...' if len(only_va) > 5 else ''}); the labels would "
                         "not match")
    if len(a) < 2:
        raise ValueError(f"{root}: one class ({a[0]!r}); classification needs at least two")


def datasets(data: str, img_size: int = 32, seed: int = 0,
             augment: bool | dict = False) -> tuple[Dataset, Dataset, int]:
    """``(train, val, num_classes)`` for ``data`` = "digits" or an image-folder path."""
    check_data(data)
    if data == "digits":
        tr = digits("train", img_size, seed, augment=augment)
        va = digits("val", img_size, seed)
    else:
        tr = image_folder(data, "train", img_size, augment=bool(augment))
        va = image_folder(data, "val", img_size)
        check_splits(data, tr, va)
    return tr, va, num_classes(tr)


# ---------------------------------------------------------------------------- sampling
class EpochSampler(Sampler):
    """A permutation fixed by ``seed + epoch`` (the same one DistributedSampler draws), so a
    single process with batch 2b sees exactly the union of two ranks' batches of b."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, no padding: evaluation counts each sample once."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index * 2_654_435_761) % (2 ** 63)


class SeededDataset(Dataset):
    """``dataset[i]`` with torch, python and numpy RNGs seeded from ``(seed, epoch, i)``.

    The caller's RNG states are restored afterwards, so loading data consumes no randomness
    from the training loop (dropout, gate noise) either.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, epoch: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices):
        fast = getattr(self.dataset, "getitems_seeded", None)
        if fast is not None:  # the dataset seeds itself per sample, batched
            return fast(indices, self.seed, self.epoch)
        return [self[i] for i in indices]

    def __getitem__(self, i):
        fast = getattr(self.dataset, "getitems_seeded", None)
        if fast is not None:
            return fast([i], self.seed, self.epoch)[0]
        s = _item_seed(self.seed, self.epoch, int(i))
        t_state, p_state, n_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (2 ** 32))
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(t_state)
            random.setstate(p_state)
            np.random.set_state(n_state)


def loaders(data: str, img_size: int = 32, batch_size: int = 64, workers: int = 0,
            seed: int = 0, distributed: bool = False,
            augment: bool | dict = False) -> tuple[DataLoader, DataLoader, int]:
    """Train and validation loaders; with ``distributed`` each rank sees its own shard.

    ``batch_size`` is per process. The training order of epoch ``e`` is the permutation of
    ``seed + e`` (``pyengine.train.fit`` calls ``sampler.set_epoch``).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    tr, va, n = datasets(data, img_size, seed, augment=augment)
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        from pyengine.train import distributed as dist
        dist.init()  # a no-op when the process group exists
        sampler = DistributedSampler(tr, shuffle=True, seed=seed)
        val_sampler = ShardSampler(len(va), dist.rank(), dist.world_size())
    else:
        sampler, val_sampler = EpochSampler(len(tr), seed), None
    train = DataLoader(tr, batch_size=batch_size, sampler=sampler, num_workers=workers,
                       drop_last=len(sampler) > batch_size)
    val = DataLoader(va, batch_size=batch_size * 2, shuffle=False, sampler=val_sampler,
                     num_workers=workers)
    return train, val, n
