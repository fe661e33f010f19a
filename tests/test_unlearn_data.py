"""Data: built-in digits, forget splits, in-memory loaders, and CIFAR-10/100 and ImageFolder from tiny local files."""

import os
import pickle
import re

import numpy as np
import pytest
import torch

from sfron_ops.unlearn import data as D

pytest.importorskip("sklearn")
torchvision = pytest.importorskip("torchvision")


def test_digits_corruption_is_fixed_per_seed():
    a = D.digits(0, noise=0.5)
    b = D.digits(0, noise=0.5)
    c = D.digits(1, noise=0.5)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0][:10], c[0][:10])
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert len(x_te) == pytest.approx(0.25 * 1797, abs=10)
    assert sorted(set(y_te.tolist())) == list(range(10))  # stratified
    clean = D.digits(0, noise=0.0)[0]
    assert clean.min() >= 0 and clean.max() <= 1
    with pytest.raises(ValueError, match="Invalid noise: -1"):
        D.digits(0, noise=-1)


def test_choose_forget():
    targets = np.repeat(np.arange(5), 20)
    forget, remain = D.choose_forget(targets, "random", fraction=0.1, seed=3)
    assert len(forget) == 10 and len(remain) == 90
    assert sorted(np.concatenate([forget, remain]).tolist()) == list(range(100))
    again, _ = D.choose_forget(targets, "random", fraction=0.1, seed=3)
    assert np.array_equal(forget, again)
    forget, remain = D.choose_forget(targets, "class", forget_class=2)
    assert set(targets[forget]) == {2} and 2 not in set(targets[remain]) and len(forget) == 20
    with pytest.raises(ValueError, match="Invalid fraction: 1.5"):
        D.choose_forget(targets, "random", fraction=1.5)
    with pytest.raises(ValueError, match="Invalid forget_class: 7"):
        D.choose_forget(targets, "class", forget_class=7)
    with pytest.raises(ValueError, match="Invalid mode: 'some'"):
        D.choose_forget(targets, "some")


def test_tensor_loader():
    x, y = torch.arange(10).float().unsqueeze(1), torch.arange(10)
    loader = D.TensorLoader(x, y, 4, shuffle=True, seed=5)
    assert len(loader) == 3
    epoch = torch.cat([b[1] for b in loader])
    assert sorted(epoch.tolist()) == list(range(10))
    second = torch.cat([b[1] for b in loader])
    assert not torch.equal(epoch, second)  # a new order every pass
    twin = D.TensorLoader(x, y, 4, shuffle=True, seed=5)
    assert torch.equal(torch.cat([b[1] for b in twin]), epoch)
    assert len(D.TensorLoader(x, y, 4, drop_last=True)) == 2
    assert torch.equal(next(iter(D.TensorLoader(x, y, 4)))[1], torch.arange(4))
    with pytest.raises(ValueError, match="Invalid batch_size: 0"):
        D.TensorLoader(x, y, 0)
    with pytest.raises(ValueError, match="samples"):
        D.TensorLoader(x, y[:5], 2)


def test_digits_split_class_mode_restricts_the_test_set():
    split = D.digits_split(0, mode="class", forget_class=3, noise=0.0)
    assert set(split.targets[split.forget_idx]) == {3}
    test = split.loader("test", 1000, shuffle=False)
    labels = torch.cat([b[1] for b in test])
    assert 3 not in labels.tolist() and len(labels) > 400
    with pytest.raises(ValueError, match="Invalid split: 'valid'"):
        split.loader("valid", 10, shuffle=False)


def _write_cifar(root, name, n_train=12, n_test=6, classes=10):
    rng = np.random.default_rng(0)
    folder, files = D.cifar_files(name)
    path = os.path.join(root, folder)
    os.makedirs(path)
    label_key = "labels" if name == "cifar10" else "fine_labels"
    train_files = [f for f in files if f.startswith("data_batch")] or ["train"]
    test_file = "test_batch" if name == "cifar10" else "test"
    per = n_train // len(train_files)
    for f in train_files:
        with open(os.path.join(path, f), "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (per, 3072), dtype=np.uint8),
                         label_key: rng.integers(0, classes, per).tolist()}, fh)
    with open(os.path.join(path, test_file), "wb") as fh:
        pickle.dump({"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                     label_key: rng.integers(0, classes, n_test).tolist()}, fh)
    meta_file, key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(os.path.join(path, meta_file), "wb") as fh:
        pickle.dump({key: [f"class{i}" for i in range(classes)]}, fh)
    return per * len(train_files)


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickle_batches(tmp_path, name, classes):
    n_train = _write_cifar(str(tmp_path), name, n_train=10 if name == "cifar10" else 12, classes=classes)
    train, train_eval, test = D.cifar(str(tmp_path), name)
    assert len(train) == n_train and len(test) == 6 and len(train.classes) == classes
    img, label = train_eval[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= label < classes
    split = D.dataset_split(name, train, train_eval, test, fraction=0.2, seed=0)
    assert len(split.forget_idx) == round(0.2 * n_train) and split.input_shape == (3, 32, 32)
    assert split.num_classes == classes
    x, y = next(iter(split.loader("forget", 4, shuffle=True, seed=0)))
    assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.long
    # the real torchvision checksums cannot match these files
    with pytest.raises(RuntimeError, match="corrupted"):
        D.cifar(str(tmp_path), name, verify_checksums=True)


def test_cifar_missing_files_and_bad_name(tmp_path):
    _write_cifar(str(tmp_path), "cifar10")
    os.remove(os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3"))
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        D.cifar(str(tmp_path), "cifar10")
    with pytest.raises(ValueError, match="Invalid name: 'svhn'"):
        D.cifar(str(tmp_path), "svhn")


def _write_folder(root, classes, per_class, size=20):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in classes:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, c, f"{i}.png"))


def test_image_folder(tmp_path):
    train_root, test_root = str(tmp_path / "train"), str(tmp_path / "val")
    _write_folder(train_root, ["ant", "bee", "cat"], 4)
    _write_folder(test_root, ["ant", "bee", "cat"], 2)
    train, train_eval, test = D.image_folder(train_root, test_root, image_size=16)
    assert len(train) == 12 and len(test) == 6 and train.classes == ["ant", "bee", "cat"]
    assert train_eval[0][0].shape == (3, 16, 16)
    split = D.dataset_split("folder", train, train_eval, test, mode="class", forget_class=1)
    assert len(split.forget_idx) == 4 and len(split.test_idx) == 4
    labels = torch.cat([b[1] for b in split.loader("test", 10, shuffle=False)])
    assert 1 not in labels.tolist()
    bad = str(tmp_path / "other")
    _write_folder(bad, ["ant", "dog"], 1)
    with pytest.raises(ValueError, match="classes"):
        D.image_folder(train_root, bad)
    with pytest.raises(FileNotFoundError, match="test_root="):
        D.image_folder(train_root, str(tmp_path / "missing"))


@pytest.mark.parametrize("damage, message", [
    ("garbage", "is not a readable cifar10 file"),
    ("list", "is not a cifar10 file"),
    ("shape", "'data' must be a uint8 array of N x 3072"),
    ("label", "label 10 is not a class index in [0, 10)"),
    ("count", "'labels' must be a list of"),
])
def test_cifar_files_are_checked_before_use(tmp_path, damage, message):
    """A damaged batch file is a DataError naming the file, not a failure deep inside training."""
    _write_cifar(str(tmp_path), "cifar10")
    path = os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3")
    with open(path, "rb") as fh:
        entry = pickle.load(fh)
    if damage == "garbage":
        content = b"\x80\x04not a pickle"
    else:
        if damage == "list":
            entry = [entry]
        elif damage == "shape":
            entry["data"] = entry["data"][:, :100]
        elif damage == "label":
            entry["labels"][0] = 10
        else:
            entry["labels"] = entry["labels"][1:]
        content = pickle.dumps(entry)
    with open(path, "wb") as fh:
        fh.write(content)
    with pytest.raises(D.DataError, match=re.escape(path) + ".*" + re.escape(message)):
        D.cifar(str(tmp_path), "cifar10")


def test_image_folder_fingerprint_reads_and_decodes_every_file(tmp_path, caplog):
    train_root, test_root = tmp_path / "train", tmp_path / "val"
    _write_folder(str(train_root), ["ant", "bee"], 3)
    _write_folder(str(test_root), ["ant", "bee"], 1)
    (train_root / "ant" / "notes.txt").write_text("where these came from")
    with caplog.at_level("WARNING", logger="sfron_ops.unlearn"):
        train, _, test = D.image_folder(str(train_root), str(test_root))
    assert "skipped 1 file(s) without an image extension, e.g. ant/notes.txt" in caplog.text
    first = D.fingerprint(train, test)
    assert D.fingerprint(train, test) == first
    split = D.dataset_split("folder", train, train, test, seed=0)
    assert split.fingerprint == first and split.identity()["content"] == first
    # one image changed (same size): another fingerprint
    from PIL import Image

    Image.new("RGB", (20, 20), (1, 2, 3)).save(train_root / "bee" / "0.png")
    assert D.fingerprint(train, test) != first
    bad = train_root / "bee" / "1.png"
    bad.write_bytes(b"GIF89a but not really")
    with pytest.raises(D.DataError, match=re.escape(str(bad)) + " is not a readable image"):
        D.fingerprint(train, test)
    for f in (test_root / "bee").iterdir():
        f.unlink()
    with pytest.raises(D.DataError, match=f"test_root={str(test_root)!r}: .*bee"):
        D.image_folder(str(train_root), str(test_root))


def test_split_identities_tell_data_and_forget_sets_apart():
    a = D.digits_split(0, fraction=0.1)
    b = D.digits_split(0, fraction=0.11)
    c = D.digits_split(1, fraction=0.1)
    assert a.identity() == b.identity() != c.identity()  # another seed corrupts the images differently
    assert a.forget_identity()["fraction"] == 0.1 and a.forget_identity()["count"] == round(0.1 * 1347)
    assert a.forget_identity() != b.forget_identity()
    assert a.forget_identity()["samples"] != D.digits_split(2, fraction=0.1).forget_identity()["samples"]
    k = D.digits_split(0, mode="class", forget_class=3, noise=0.0)
    assert k.forget_identity() == {"mode": "class", "forget_class": 3, "count": len(k.forget_idx),
                                   "samples": k.forget_identity()["samples"]}
