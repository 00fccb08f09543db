"""Image classification data: the `imagefolder` and `npz` layouts, batches for a vision backbone, and the digits set.

`imagefolder`: `<root>/<split>/<class name>/<image file>`; class indices follow the sorted class names of the
training split (torchvision's ImageFolder convention). `npz`: `<root>/<split>.npz`, or a split given as a path ending
in `.npz`, holding `images` (N, H, W) or (N, H, W, C) with C = 1 or 3, uint8 in 0..255 or float in [0, 1], `labels`
(N,) class indices, and optionally `class_names` (a string array; default "0", "1", ...).
Images stay uint8 at their stored size in memory; `ImageBatcher` resizes each batch to the backbone's input size
(bilinear) and normalises it with the backbone's mean and std.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ipt_ds.backbone import ImageSpec

IMAGE_FORMATS = ("imagefolder", "npz")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAKE_DIGITS = "make them with `ipt-ds make-digits DIR` and pass --data.root=DIR"


@dataclass
class ImageSplit:
    images: list[torch.Tensor]
    """One (C, H, W) uint8 tensor per image, C = 1 or 3."""
    labels: list[int]
    class_names: list[str]


def split_path(layout: str, root: str, split: str) -> Path:
    """Where a split lives: `split` itself when it is a path to a .npz file, else `<root>/<split>[.npz]`; a clear
    error when it is not there."""
    if layout == "npz" and split.endswith(".npz"):
        path = Path(split).expanduser()
    elif not root:
        raise ValueError(f"data.root is empty: data.format {layout} reads <root>/{split}"
                         f"{'.npz' if layout == 'npz' else '/<class>/<image>'}; set data.root (for the digits: "
                         f"{MAKE_DIGITS})")
    else:
        path = Path(root).expanduser() / (f"{split}.npz" if layout == "npz" else split)
    if not path.exists():
        hint = MAKE_DIGITS if layout == "npz" else "expected <root>/<split>/<class name>/<image files>"
        raise ValueError(f"data: split '{split}' not found at '{path}'; {hint}")
    return path


def read_image_split(layout: str, root: str, split: str, *, class_names: list[str] | None = None) -> ImageSplit:
    """Read one split; `class_names` (from the training split) fixes the label order for the others."""
    path = split_path(layout, root, split)
    return read_npz(path, class_names) if layout == "npz" else read_imagefolder(path, class_names)


def class_names_of(layout: str, root: str, split: str) -> list[str]:
    """The class names of a split without decoding its images."""
    path = split_path(layout, root, split)
    if layout == "imagefolder":
        return sorted(p.name for p in path.iterdir() if p.is_dir())
    with np.load(path, allow_pickle=False) as arrays:
        if "class_names" in arrays.files:
            return [str(n) for n in arrays["class_names"]]
        return [str(i) for i in range(int(arrays["labels"].max()) + 1)] if "labels" in arrays.files else []


def read_npz(path: Path, class_names: list[str] | None = None) -> ImageSplit:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz file ({err})") from None
    missing = [key for key in ("images", "labels") if key not in data]
    if missing:
        raise ValueError(f"{path}: no array {' or '.join(map(repr, missing))}; an npz split holds 'images' "
                         f"(N, H, W[, C]) and 'labels' (N,), found {sorted(data)}")
    images, labels = data["images"], data["labels"]
    if len(images) == 0:
        raise ValueError(f"{path}: 'images' is empty")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: 'images' has shape {data['images'].shape}; expected (N, H, W) or (N, H, W, C) "
                         "with C = 1 or 3, channels last")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: 'labels' has shape {labels.shape} for {images.shape[0]} images; expected "
                         f"({images.shape[0]},)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' are {labels.dtype}; expected integer class indices")
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.floating) or images.min() < 0 or images.max() > 1:
            raise ValueError(f"{path}: 'images' must be uint8 (0..255) or float in [0, 1]; got {images.dtype} in "
                             f"[{images.min()}, {images.max()}]")
        images = np.rint(images * 255).astype(np.uint8)
    names = [str(n) for n in data["class_names"]] if "class_names" in data else None
    if class_names is not None and names is not None and names != class_names:
        raise ValueError(f"{path}: 'class_names' {names[:10]} differ from the training split's {class_names[:10]}")
    class_names = class_names or names or [str(i) for i in range(labels.max() + 1)]
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"{path}: labels span [{labels.min()}, {labels.max()}] but there are {len(class_names)} "
                         f"classes {class_names[:10]}; labels index the training split's class names")
    tensors = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # (N, C, H, W)
    return ImageSplit(images=list(tensors), labels=labels.tolist(), class_names=class_names)


def read_imagefolder(directory: Path, class_names: list[str] | None = None) -> ImageSplit:
    from PIL import Image, UnidentifiedImageError

    found = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not found:
        raise ValueError(f"{directory}: no class directories; expected {directory}/<class name>/<image files>")
    unknown = sorted(set(found) - set(class_names or found))
    if unknown:
        raise ValueError(f"{directory}: classes {unknown} are not in the training split's classes {class_names}")
    class_names = class_names or found
    images, labels = [], []
    for name in found:
        files = sorted(p for p in (directory / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{directory / name}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            try:
                with Image.open(file) as image:
                    image = image.convert("L" if image.mode in ("1", "L", "I", "I;16") else "RGB")
                    array = np.asarray(image)
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"{file}: cannot read this image ({err})") from None
            array = array[..., None] if array.ndim == 2 else array
            images.append(torch.from_numpy(array.transpose(2, 0, 1).copy()))  # (C, H, W)
            labels.append(class_names.index(name))
    return ImageSplit(images=images, labels=labels, class_names=class_names)


class ImageBatcher:
    """Features {"image": (C, H, W) uint8, "labels": int} -> {"pixel_values": (B, C', H', W'), "labels": (B,)}."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        self.mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std).view(1, -1, 1, 1)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        images = [f["image"] for f in features]
        if all(image.shape == images[0].shape for image in images):
            pixels = self.prepare(torch.stack(images))
        else:
            pixels = torch.cat([self.prepare(image[None]) for image in images])
        batch = {"pixel_values": pixels}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) uint8 -> (B, C', H', W') normalised floats at the backbone's size and channel count."""
        x = images.float() / 255
        channels = self.spec.num_channels
        if x.shape[1] != channels:  # grey -> RGB by repetition, RGB -> grey by the channel mean
            x = x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != self.spec.size:
            x = torch.nn.functional.interpolate(x, size=self.spec.size, mode="bilinear", align_corners=False,
                                                antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std


def write_digits(directory: str, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 layout: str = "npz") -> dict[str, int]:
    """Write scikit-learn's 8x8 digits (1,797 images, 10 classes) as `train`, `val` and `test` splits (stratified,
    drawn with `seed`) in `layout` (npz or imagefolder); returns the split sizes. Refuses a directory that is not
    empty."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(directory).expanduser()
    if layout not in IMAGE_FORMATS:
        raise ValueError(f"--format '{layout}': choose one of {', '.join(IMAGE_FORMATS)}")
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(f"--val_fraction {val_fraction} and --test_fraction {test_fraction} must be > 0 and sum to "
                         "less than 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"'{out}' exists and is not an empty directory; choose a new one (nothing is overwritten)")
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # (N, 8, 8); the set's pixels count 0..16
    indices = np.arange(len(images))
    train, test = train_test_split(indices, test_size=test_fraction, random_state=seed, stratify=digits.target)
    train, val = train_test_split(train, test_size=val_fraction / (1 - test_fraction), random_state=seed,
                                  stratify=digits.target[train])
    class_names = np.array([str(d) for d in range(10)])
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    for split, chosen in splits.items():
        if layout == "npz":
            np.savez(out / f"{split}.npz", images=images[chosen], labels=digits.target[chosen], class_names=class_names)
            continue
        from PIL import Image

        for index in chosen:
            folder = out / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{index:04d}.png")
    return {split: len(chosen) for split, chosen in splits.items()}
