"""Data for the unlearning scenarios: built-in digits, CIFAR-10/100 and ImageFolder from local files.

Nothing is ever downloaded. A scenario is a :class:`Split`: the training set (with training and
evaluation transforms), the test set, and which training samples are forgotten. Data that cannot be
used (a missing or corrupt file, an image that does not decode) is a :class:`DataError` naming the
file, raised before anything trains.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoints import digest

log = logging.getLogger("sfron_ops.unlearn")


class DataError(ValueError):
    """Data that cannot be used; the message names the file or folder and what is wrong with it."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that does not exist."""


class TensorLoader:
    """Batches of in-memory tensors, like a ``DataLoader`` over a ``TensorDataset`` without the per-sample cost.

    Shuffling draws from ``self.generator`` (seeded), so two loaders with the same seed give the
    same batches, and the runner can checkpoint the order exactly.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed) if shuffle else None

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min(n, (b + 1) * self.batch_size))
            if order is None:
                yield self.x[sl], self.y[sl]
            else:
                idx = order[sl]
                yield self.x[idx], self.y[idx]


def choose_forget(targets, mode: str = "random", *, fraction: float = 0.1, forget_class: int | None = None,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the forget and remain samples.

    ``mode="random"``: a uniformly random ``fraction`` of the samples (rounded to the nearest count, at least one).
    ``mode="class"``: every sample of ``forget_class``.
    """
    targets = np.asarray(targets)
    n = len(targets)
    if mode == "random":
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"Invalid fraction: {fraction!r}; expected a number in (0, 1)")
        k = max(1, int(round(fraction * n)))
        forget = np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    elif mode == "class":
        classes = np.unique(targets)
        if forget_class is None or forget_class not in classes:
            raise ValueError(f"Invalid forget_class: {forget_class!r}; expected one of {classes.tolist()}")
        forget = np.flatnonzero(targets == forget_class)
    else:
        raise ValueError(f"Invalid mode: {mode!r}; expected 'random' or 'class'")
    keep = np.ones(n, dtype=bool)
    keep[forget] = False
    return forget, np.flatnonzero(keep)


@dataclass
class Split:
    """An unlearning scenario over one dataset.

    ``train`` / ``train_eval`` hold the same training samples with training and evaluation
    transforms (they may be the same object); ``test`` is the held-out set. ``test_idx``
    restricts the test set (class-wise forgetting measures TA on the remaining classes).
    Either all three are tensors pairs ``(x, y)`` (in-memory data) or all are datasets.
    ``fingerprint`` is a digest of the data's content (see :func:`fingerprint`).
    """

    name: str
    train: object
    train_eval: object
    test: object
    targets: np.ndarray
    forget_idx: np.ndarray
    remain_idx: np.ndarray
    num_classes: int
    input_shape: tuple
    test_idx: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, tuple)

    def identity(self) -> dict:
        """What identifies the data (its content and how it is read), whichever samples are forgotten."""
        return {"content": self.fingerprint, **{k: v for k, v in self.info.items() if k not in _FORGET_INFO}}

    def forget_identity(self) -> dict:
        """What identifies the forget set: how it was chosen, its size and a digest of its indices."""
        how = {"mode": self.info.get("mode")}
        how.update({"fraction": self.info.get("fraction")} if how["mode"] == "random" else
                   {"forget_class": self.info.get("forget_class")})
        return {**how, "count": int(len(self.forget_idx)),
                "samples": digest(np.asarray(self.forget_idx, dtype=np.int64))}

    def loader(self, which: str, batch_size: int, *, shuffle: bool, seed: int = 0, eval_transform: bool = False,
               num_workers: int = 0) -> object:
        """A loader over ``which`` in ``{"train", "forget", "remain", "test"}``."""
        if which == "test":
            source, idx = self.test, self.test_idx
        else:
            source = self.train_eval if eval_transform else self.train
            idx = {"train": None, "forget": self.forget_idx, "remain": self.remain_idx}.get(which, "bad")
            if isinstance(idx, str):
                raise ValueError(f"Invalid split: {which!r}; expected 'train', 'forget', 'remain' or 'test'")
        if self.in_memory:
            x, y = source
            if idx is not None:
                index = torch.as_tensor(idx, dtype=torch.long)
                x, y = x[index], y[index]
            return TensorLoader(x, y, batch_size, shuffle=shuffle, seed=seed)
        dataset = source if idx is None else Subset(source, idx.tolist())
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          num_workers=num_workers, pin_memory=torch.cuda.is_available())


_FORGET_INFO = ("mode", "fraction", "forget_class")


# ---------------------------------------------------------------------------------------------- digits
def digits(seed: int = 0, *, noise: float = 0.5, test_fraction: float = 0.25):
    """scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn) as ``(x_train, y_train, x_test, y_test)``.

    Pixels are scaled to [0, 1]; with ``noise > 0`` every image gets its own fixed Gaussian
    corruption of that standard deviation. The corruption is drawn once per sample, so a network
    can memorise its training images while the test images stay hard: the regime where removing
    a random subset of the training set has a visible effect.
    """
    from sklearn.datasets import load_digits

    if noise < 0:
        raise ValueError(f"Invalid noise: {noise!r}")
    bunch = load_digits()
    x = bunch.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    if noise > 0:
        x = x + rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    # stratified train/test split
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test_mask[rng.choice(idx, int(round(test_fraction * len(idx))), replace=False)] = True
    tr, te = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    return torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]), torch.from_numpy(y[te])


def digits_split(seed: int = 0, *, mode: str = "random", fraction: float = 0.1, forget_class: int | None = None,
                 noise: float = 0.5, test_fraction: float = 0.25) -> Split:
    """The digits scenario for ``seed``: data, corruption, split and forget set all follow the seed."""
    x_tr, y_tr, x_te, y_te = digits(seed, noise=noise, test_fraction=test_fraction)
    targets = y_tr.numpy()
    forget, remain = choose_forget(targets, mode, fraction=fraction, forget_class=forget_class, seed=seed + 1)
    test_idx = None
    if mode == "class":
        test_idx = np.flatnonzero(y_te.numpy() != forget_class)
    return Split(name=f"digits-{mode}", train=(x_tr, y_tr), train_eval=(x_tr, y_tr), test=(x_te, y_te),
                 targets=targets, forget_idx=forget, remain_idx=remain, num_classes=10, input_shape=(1, 8, 8),
                 test_idx=test_idx, info=dict(dataset="digits", noise=noise, test_fraction=test_fraction, mode=mode,
                                              fraction=fraction, forget_class=forget_class),
                 fingerprint=digest(x_tr, y_tr, x_te, y_te))


# ---------------------------------------------------------------------------------------------- CIFAR
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _local_cifar_class(name: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100

    class LocalCIFAR(base):
        """torchvision's CIFAR loader that never downloads; checksums are checked only when asked."""

        verify_checksums = False

        def _check_integrity(self) -> bool:
            if self.verify_checksums:
                return super()._check_integrity()
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f, _ in
                       self.train_list + self.test_list)

        def _load_meta(self) -> None:
            if self.verify_checksums:
                return super()._load_meta()
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as fh:
                self.classes = pickle.load(fh, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    LocalCIFAR.__name__ = LocalCIFAR.__qualname__ = f"Local{base.__name__}"
    return LocalCIFAR


def cifar_files(name: str) -> tuple[str, list[str]]:
    """The folder and the files torchvision's loader expects for ``name`` under ``root``."""
    cls = _local_cifar_class(name)
    return cls.base_folder, [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _check_cifar_files(root: str, name: str) -> None:
    """Every file of ``name`` under ``root`` exists and holds what torchvision's loader expects."""
    folder, files = cifar_files(name)
    missing = [f for f in files if not os.path.isfile(os.path.join(root, folder, f))]
    if missing:
        raise MissingDataError(f"{name} not found under root={root!r}: missing "
                               f"{os.path.join(root, folder, missing[0])} (downloads are off; extract the python "
                               "version of the dataset there)")

    def load(f):
        path = os.path.join(root, folder, f)
        try:
            with open(path, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
        except Exception as e:  # garbage, truncation and foreign pickles fail in many ways
            raise DataError(f"{path} is not a readable {name} file ({type(e).__name__}: {e})") from None
        if not isinstance(entry, dict):
            raise DataError(f"{path} is not a {name} file (holds a {type(entry).__name__}, not a dict)")
        return path, entry

    meta_name, label_key = ("batches.meta", "labels") if name == "cifar10" else ("meta", "fine_labels")
    path, meta = load(meta_name)
    names = meta.get("label_names" if name == "cifar10" else "fine_label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{path} has no list of class names")
    for f in files:
        if f == meta_name:
            continue
        path, entry = load(f)
        data, labels = entry.get("data"), entry.get(label_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            shape = getattr(data, "shape", None)
            raise DataError(f"{path}: 'data' must be a uint8 array of N x 3072 pixels, got "
                            f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
        if not isinstance(labels, list) or len(labels) != len(data):
            raise DataError(f"{path}: {label_key!r} must be a list of {len(data)} labels")
        bad = [v for v in labels if isinstance(v, bool) or not isinstance(v, (int, np.integer))
               or not 0 <= v < len(names)]
        if bad:
            raise DataError(f"{path}: label {bad[0]!r} is not a class index in [0, {len(names)})")


def cifar(root: str, name: str = "cifar10", *, augment: bool = True, verify_checksums: bool = False):
    """``(train, train_eval, test)`` datasets of CIFAR-10 or CIFAR-100 from the python pickle batches under ``root``.

    ``root`` holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), as extracted from the
    official archive. Downloads are off; a missing file is an error that names it.
    """
    from torchvision import transforms as T

    if name not in CIFAR_STATS:
        raise ValueError(f"Invalid name: {name!r}; expected one of {tuple(CIFAR_STATS)}")
    _check_cifar_files(root, name)
    cls = _local_cifar_class(name)
    cls.verify_checksums = verify_checksums
    mean, std = CIFAR_STATS[name]
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []) + normalize)
    eval_tf = T.Compose(normalize)
    train = cls(root, train=True, transform=train_tf, download=False)
    train_eval = cls(root, train=True, transform=eval_tf, download=False)
    test = cls(root, train=False, transform=eval_tf, download=False)
    return train, train_eval, test


def image_folder(train_root: str, test_root: str, *, image_size: int = 32, augment: bool = True,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """``(train, train_eval, test)`` ``ImageFolder`` datasets (one sub-folder per class) resized to ``image_size``.

    The test folder must have the same class folders as the training folder.
    """
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    for label, path in (("train_root", train_root), ("test_root", test_root)):
        if not os.path.isdir(path):
            raise MissingDataError(f"{label}={path!r} is not a folder")
    base = [T.Resize((image_size, image_size))]
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    aug = [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()] if augment else []

    def folder(root, label, transform):
        try:
            dataset = ImageFolder(root, transform=transform)
        except FileNotFoundError as e:  # no class folders, or a class folder without images
            raise DataError(f"{label}={root!r}: {e}") from None
        skipped = [os.path.relpath(os.path.join(d, f), root) for c in dataset.classes
                   for d, _, names in os.walk(os.path.join(root, c)) for f in names if not f.startswith(".")]
        skipped = sorted(set(skipped) - {os.path.relpath(p, root) for p, _ in dataset.samples})
        if skipped:
            log.warning("%s=%r: skipped %d file(s) without an image extension, e.g. %s", label, root, len(skipped),
                        skipped[0])
        return dataset

    train = folder(train_root, "train_root", T.Compose(base + aug + normalize))
    train_eval = ImageFolder(train_root, transform=T.Compose(base + normalize))
    test = folder(test_root, "test_root", T.Compose(base + normalize))
    if test.classes != train.classes:
        raise DataError(f"test_root={test_root!r} has classes {test.classes[:5]}... but train_root has "
                        f"{train.classes[:5]}...")
    return train, train_eval, test


def fingerprint(*datasets) -> str:
    """A digest of the datasets' content: the arrays and labels of in-memory datasets (CIFAR), or the bytes
    and labels of every file of an ``ImageFolder``, each of which is also decoded as training will decode it
    (a file that is not a readable image is a :class:`DataError` naming it)."""
    parts = []
    for dataset in datasets:
        if hasattr(dataset, "samples"):
            parts.append(_image_files_digest(dataset))
        elif isinstance(getattr(dataset, "data", None), np.ndarray):
            parts.append(digest(dataset.data, np.asarray(dataset.targets, dtype=np.int64)))
        else:
            parts.append(digest(np.asarray(dataset.targets, dtype=np.int64)))
    return digest(*parts)


def _image_files_digest(dataset) -> str:
    from PIL import Image

    parts = []
    for path, target in dataset.samples:
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            with Image.open(io.BytesIO(raw)) as img:
                img.convert("RGB")
        except Exception as e:  # PIL reports unreadable files with many exception types
            raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})") from None
        parts += [os.path.relpath(path, dataset.root), str(target), raw]
    return digest(*parts)


def dataset_split(name: str, train: Dataset, train_eval: Dataset, test: Dataset, *, mode: str = "random",
                  fraction: float = 0.1, forget_class: int | None = None, seed: int = 0,
                  data_fingerprint: str | None = None) -> Split:
    """A :class:`Split` over torchvision-style datasets (with a ``targets`` list).

    ``data_fingerprint``: :func:`fingerprint` of ``(train, test)`` if already known (computed otherwise).
    """
    targets = np.asarray(train.targets)
    forget, remain = choose_forget(targets, mode, fraction=fraction, forget_class=forget_class, seed=seed + 1)
    test_idx = np.flatnonzero(np.asarray(test.targets) != forget_class) if mode == "class" else None
    x0 = train_eval[0][0]
    num_classes = len(getattr(train, "classes", None) or np.unique(targets))
    if data_fingerprint is None:
        data_fingerprint = fingerprint(train, test)
    transforms = {k: repr(getattr(d, "transform", None)) for k, d in (("transform", train),
                                                                       ("eval_transform", train_eval))}
    return Split(name=f"{name}-{mode}", train=train, train_eval=train_eval, test=test, targets=targets,
                 forget_idx=forget, remain_idx=remain, num_classes=num_classes, input_shape=tuple(x0.shape),
                 test_idx=test_idx, info=dict(dataset=name, **transforms, mode=mode, fraction=fraction,
                                              forget_class=forget_class),
                 fingerprint=data_fingerprint)
