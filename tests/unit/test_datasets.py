"""Datasets: built from images and annotation files the tests make; digits from sklearn."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from clt_lightning.data.dataset_readers import coco_single_labels, digits_split, imagenet100_classes
from clt_lightning.data.datasets import DatasetConfig, build_dataset, list_datasets
from clt_lightning.data.image_datasets import subset_indices
from clt_lightning.errors import ConfigError, DataNotFoundError, UnreadableImageError


def save_png(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color=(value, value // 2, 255 - value)).save(path)
    return path


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


# ---------------------------------------------------------------------- registry / config


def test_list_datasets() -> None:
    assert list_datasets() == ["cifar100", "coco", "digits", "imagefolder", "imagenet100"]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"'cifar10'.*cifar100.*imagenet100"):
        DatasetConfig(name="cifar10")
    with pytest.raises(ConfigError, match="max_images"):
        DatasetConfig(max_images=0)


def test_subset_indices_is_seeded_sorted_prefix() -> None:
    want = np.sort(np.random.default_rng(0).permutation(10)[:4])
    assert np.array_equal(subset_indices(10, 4), want)
    assert np.array_equal(subset_indices(3, 5), np.arange(3))
    assert np.array_equal(subset_indices(3, None), np.arange(3))


# ---------------------------------------------------------------------- digits


def test_digits_split_is_the_documented_permutation() -> None:
    perm = np.random.default_rng(0).permutation(1797)
    train, val = digits_split("train"), digits_split("val")
    assert np.array_equal(train, np.sort(perm[:1437]))
    assert np.array_equal(val, np.sort(perm[1437:]))
    assert len(np.union1d(train, val)) == 1797 and len(np.intersect1d(train, val)) == 0
    with pytest.raises(ConfigError, match=r"'test'.*'train', 'val'"):
        digits_split("test")


def test_digits_images_labels_and_views() -> None:
    sk = load_digits()
    ds = build_dataset(DatasetConfig(name="digits"), "val", transform=None)
    index = digits_split("val")
    assert len(ds) == 360 and ds.class_names[3] == "three" and len(ds.class_names) == 10
    assert np.array_equal(ds.labels, sk.target[index])
    image, label = ds[5]
    assert label == sk.target[index[5]]
    want = np.round(sk.images[index[5]] * 255 / 16).astype(np.uint8)
    assert image.size == (8, 8) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image)[..., 0], want)  # white digit on black
    assert np.array_equal(np.asarray(image)[..., 2], want)
    raw = ds.raw_image(5)
    assert raw.size == (224, 224) and raw.mode == "RGB"
    assert ds.describe_image(5) == f"digits/val/{index[5]} ({ds.class_names[label]})"
    assert ds.identity() == {
        "name": "digits",
        "split": "val",
        "root": None,
        "n_images": 360,
        "max_images": None,
        "transform": None,
    }
    with pytest.raises(IndexError):
        ds[360]


def test_digits_with_teacher_transform_and_max_images(tiny_teacher) -> None:
    config = DatasetConfig(name="digits", max_images=50)
    ds = build_dataset(config, "train", transform=tiny_teacher.preprocess)
    assert len(ds) == 50
    chosen = digits_split("train")[subset_indices(1437, 50)]
    assert np.array_equal(ds.labels, load_digits().target[chosen])
    pixels, label = ds[0]
    assert pixels.shape == (3, 32, 32) and label == ds.labels[0]
    assert torch.equal(pixels, tiny_teacher.preprocess(build_dataset(config, "train")[0][0]))
    transform = ds.identity()["transform"]
    assert "Resize" in transform and not re.search("0x[0-9a-f]{6,}", transform)


def test_split_roles_resolve_through_config() -> None:
    config = DatasetConfig(name="digits", train_split="val", val_split="train")
    assert build_dataset(config, "train").split == "val"
    assert len(build_dataset(config, "val")) == 1437


# ---------------------------------------------------------------------- imagefolder


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(["zebra", "ant", "cat"]):
            for k in range(n):
                save_png(root / split / name / f"img{k}.png", 40 * c + 10 * k)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


def test_imagefolder(folder_root: Path) -> None:
    config = DatasetConfig(name="imagefolder", root=str(folder_root))
    ds = build_dataset(config, "train", transform=to_tensor)
    assert ds.class_names == ["ant", "cat", "zebra"]
    assert len(ds) == 9 and list(ds.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pixels, label = ds[4]
    assert label == 1 and pixels.shape == (3, 10, 12)
    assert pixels[0, 0, 0].item() == 80 + 10  # cat (c=2 at creation), k=1
    assert ds.describe_image(4) == str(folder_root / "train" / "cat" / "img1.png")
    assert ds.identity()["root"] == str(folder_root.resolve())
    assert len(build_dataset(config, "val")) == 6


def test_imagefolder_unreadable_image(folder_root: Path) -> None:
    bad = folder_root / "val" / "ant" / "img0.png"
    bad.write_bytes(b"\x89PNG not really")
    ds = build_dataset(DatasetConfig(name="imagefolder", root=str(folder_root)), "val", None)
    with pytest.raises(UnreadableImageError, match="img0.png") as info:
        ds[0]
    assert info.value.path == str(bad)
    assert ds[1][1] == 0  # the other images still load


def test_imagefolder_missing_paths(tmp_path: Path, folder_root: Path) -> None:
    with pytest.raises(DataNotFoundError, match="nowhere"):
        build_dataset(DatasetConfig(name="imagefolder", root=str(tmp_path / "nowhere")), "train")
    with pytest.raises(DataNotFoundError, match=r"test.*\['train', 'val'\]"):
        build_dataset(DatasetConfig(name="imagefolder", root=str(folder_root)), "test")
    with pytest.raises(ConfigError, match="dataset.root is required"):
        build_dataset(DatasetConfig(name="imagefolder"), "train")


# ---------------------------------------------------------------------- imagenet100


def test_imagenet100_class_list() -> None:
    classes = imagenet100_classes()
    wnids = [w for w, _ in classes]
    assert len(classes) == 100 and len(set(wnids)) == 100
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert all(name and "\t" not in name for _, name in classes)
    assert wnids[:10] == [
        "n02869837", "n01749939", "n02488291", "n02107142", "n13037406",
        "n02091831", "n04517823", "n04589890", "n03062245", "n01773797",
    ]  # fmt: skip
    assert wnids[-1] == "n02090622"
    assert dict(classes)["n02123045"] == "tabby cat"


def test_imagenet100_layout(tmp_path: Path) -> None:
    classes = imagenet100_classes()
    root = tmp_path / "in100"
    for k, (wnid, _) in enumerate(classes):
        (root / "val" / wnid).mkdir(parents=True)
        if k % 25 == 0:
            save_png(root / "val" / wnid / f"ILSVRC_{k}.JPEG", k)
    ds = build_dataset(DatasetConfig(name="imagenet100", root=str(root)), "val", to_tensor)
    assert len(ds) == 4 and len(ds.class_names) == 100
    by_sorted_wnid = sorted(classes)
    for i in range(len(ds)):
        pixels, label = ds[i]
        wnid, name = by_sorted_wnid[label]
        assert ds.class_names[label] == name
        assert Path(ds.describe_image(i)).parent.name == wnid
    (root / "val" / "n02123045").rmdir()
    with pytest.raises(DataNotFoundError, match="n02123045.*layout"):
        build_dataset(DatasetConfig(name="imagenet100", root=str(root)), "val")
    with pytest.raises(DataNotFoundError, match=r"train.*<wnid>"):
        build_dataset(DatasetConfig(name="imagenet100", root=str(root)), "train")


# ---------------------------------------------------------------------- coco


def coco_instances() -> dict:
    """4 images (one unannotated), 3 categories with non-contiguous ids, listed out of order."""
    categories = [{"id": 7, "name": "kite"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    images = [
        {"id": 30, "file_name": "000030.png"},
        {"id": 10, "file_name": "000010.png"},
        {"id": 20, "file_name": "000020.png"},
        {"id": 40, "file_name": "000040.png"},
    ]
    ann = [
        # image 10: two cars of 10 beat one person of 15 (total area, not the largest box)
        (10, 3, 10.0), (10, 3, 10.0), (10, 1, 15.0),
        # image 20: a tie between kite (7) and car (3): the lower id wins
        (20, 7, 5.0), (20, 3, 5.0),
        # image 30: a single kite
        (30, 7, 1.0),
    ]  # fmt: skip
    annotations = [
        {"id": i, "image_id": im, "category_id": cat, "area": area, "iscrowd": 0}
        for i, (im, cat, area) in enumerate(ann)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_coco_single_labels_rule() -> None:
    labels = coco_single_labels(coco_instances())
    assert labels.class_names == ["person", "car", "kite"]
    assert labels.image_ids == [10, 20, 30]
    assert labels.labels == [1, 1, 2]
    assert labels.n_skipped_unannotated == 1


def test_coco_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "coco"
    instances = coco_instances()
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    for k, image in enumerate(instances["images"]):
        save_png(root / "val2017" / image["file_name"], 50 * k)
    with caplog.at_level("INFO", logger="clt_lightning.data.datasets"):
        ds = build_dataset(DatasetConfig(name="coco", root=str(root)), "val", to_tensor)
    assert "skipped 1 images without annotations" in caplog.text
    assert ds.n_skipped_unannotated == 1 and ds.identity()["n_skipped_unannotated"] == 1
    assert len(ds) == 3 and ds.class_names == ["person", "car", "kite"]
    pixels, label = ds[0]
    assert label == 1 and pixels[0, 0, 0].item() == 50  # 000010.png was written second
    assert ds.describe_image(2).endswith("000030.png")
    with pytest.raises(DataNotFoundError, match="instances_train2017.json"):
        build_dataset(DatasetConfig(name="coco", root=str(root)), "train")


# ---------------------------------------------------------------------- cifar100


def test_cifar100_missing_root_says_where_and_how(tmp_path: Path) -> None:
    config = DatasetConfig(name="cifar100", root=str(tmp_path))
    with pytest.raises(DataNotFoundError) as info:
        build_dataset(config, "train")
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message and "download: true" in message
    with pytest.raises(ConfigError, match=r"'valid'.*'train', 'val', 'test'"):
        build_dataset(config, "valid")


def test_cifar100_reads_torchvision_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake python-version CIFAR-100 (torchvision's format; md5 check patched out)."""
    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    splits = {"train": 6, "test": 4}
    data = {s: rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8) for s, n in splits.items()}
    fine = {s: list(range(n)) for s, n in splits.items()}
    for split in splits:
        with open(folder / split, "wb") as f:
            pickle.dump({"data": data[split], "fine_labels": fine[split]}, f)
    names = ["apple", "aquarium_fish", "maple_tree", "pickup_truck", "sweet_pepper", "tulip"]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)

    config = DatasetConfig(name="cifar100", root=str(tmp_path), val_split="test")
    train = build_dataset(config, "train", to_tensor)
    val = build_dataset(config, "val", to_tensor)
    assert train.class_names[1] == "aquarium fish" and train.class_names[5] == "tulip"
    assert (len(train), len(val), val.split) == (6, 4, "test")
    pixels, label = val[2]
    assert label == 2
    assert torch.equal(pixels, torch.from_numpy(data["test"][2].reshape(3, 32, 32)))
    assert val.raw_image(2).size == (32, 32)
    assert val.describe_image(2) == "cifar100/test/2 (maple tree)"
