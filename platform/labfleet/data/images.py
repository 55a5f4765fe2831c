"""8-bit image datasets from local files; nothing is ever downloaded.

Four formats:
- a `.npz` file with `x_train` and `x_test` (uint8, (n, H, W) or (n, H, W, C)) and, optionally, `y_train` and
  `y_test` (integer class labels), as `numpy.savez` writes them (torchvision's and Keras's MNIST arrays saved
  that way, or anything of one's own);
- a directory of IDX files as LeCun's MNIST and Zalando's Fashion-MNIST ship them
  (`train-images-idx3-ubyte`, `t10k-images-idx3-ubyte` and the two `*-labels-idx1-ubyte`, each optionally
  gzipped);
- a folder with `train/` and `test/` subfolders of PNG or JPEG files (read with Pillow), in one subfolder per
  class (the labels, in sorted order of the class names) or directly (no labels). All images of a folder
  must have one size, unless `size: [H, W]` is given: then each is scaled so that it covers H x W and
  centre-cropped to it. Grey images stay one channel; any other mode becomes RGB;
- a Hugging Face `datasets` directory as `DatasetDict.save_to_disk` writes it (`dataset_dict.json`, and
  `train/` and `test/` with Arrow files), read with pyarrow alone: its `Image` column, and its `ClassLabel`
  (or integer `label`) column as labels. Never the hub: only what is on disk.

Images come back as uint8 arrays of shape (n, C, H, W). `fashion_mnist` without a path is looked for under
`$LABFLEET_DATA/fashion-mnist`, then where Debian's `dataset-fashion-mnist` package installs it
(`/usr/share/datasets/fashion-mnist`). `describe` reads only the files' headers, so that `labfleet validate`
knows the image shape without loading the data.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

DEBIAN_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}
IDX_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
IDX_TYPES: dict[int, np.dtype] = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
                                  0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class ImageDataError(ValueError):
    """Files that are not an image dataset labfleet can read: the message says which file and why."""


@dataclass(frozen=True)
class ImageFiles:
    """What the headers say: the source, one image's shape (C, H, W), the split sizes, labels or not."""

    source: Path
    shape: tuple[int, int, int]
    n_train: int
    n_test: int
    labels: bool


def locate(name: str, path: str | None) -> Path:
    """The file or directory a dataset is read from."""
    if path is not None:
        source = Path(path).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"{name}: no file {source} (give dataset_kwargs.path: a local .npz with x_train "
                                    f"and x_test, or a directory of IDX files; labfleet downloads nothing)")
        return source
    candidates = []
    if os.environ.get("LABFLEET_DATA"):
        candidates.append(Path(os.environ["LABFLEET_DATA"]) / name.replace("_", "-"))
    if name in DEBIAN_DIRS:
        candidates.append(DEBIAN_DIRS[name])
    for candidate in candidates:
        if candidate.is_dir() and _idx_file(candidate, "x_train") is not None:
            return candidate
    hint = (f"install Debian's {PACKAGES[name]} package (apt-get install {PACKAGES[name]}), or "
            if name in PACKAGES else "")
    raise FileNotFoundError(f"{name}: no local copy found; {hint}give dataset_kwargs.path (a .npz, or a "
                            "directory of IDX files); labfleet downloads nothing")


def describe(name: str, path: str | None, size: tuple[int, int] | None = None) -> ImageFiles:
    """The shape, sizes and labels of a dataset's files, read from their headers only."""
    source = locate(name, path)
    if (pictures := _pictures(source)) is not None:
        return _describe_folder(source, size, pictures)
    if size is not None:
        raise ImageDataError(f"{source}: dataset_kwargs.size resizes a folder of PNG/JPEG images; these are "
                             "arrays of one size already")
    if source.is_dir():
        shapes = {key: _idx_header(file, key)[1] for key in IDX_FILES if (file := _idx_file(source, key))}
        _require(source, shapes, ("x_train", "x_test"))
    else:
        shapes = _npz_shapes(source)
    x_train, x_test = shapes["x_train"], shapes["x_test"]
    image = _image_shape(source, "x_train", x_train)
    if _image_shape(source, "x_test", x_test) != image:
        raise ImageDataError(f"{source}: x_train images are {_shown(x_train[1:])} but x_test images are "
                             f"{_shown(x_test[1:])}; both splits must have one shape")
    for x, y in (("x_train", "y_train"), ("x_test", "y_test")):
        if y in shapes and shapes[y][:1] != shapes[x][:1]:
            raise ImageDataError(f"{source}: {y} has {shapes[y][0]} labels for {shapes[x][0]} images in {x}")
    return ImageFiles(source, image, x_train[0], x_test[0], "y_train" in shapes)


def read(name: str, path: str | None, size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """x_train, x_test as uint8 (n, C, H, W); y_train, y_test as int64 where the files have them."""
    source = locate(name, path)
    if (pictures := _pictures(source)) is not None:  # listed (and, from Arrow, read) once
        return _read_folder(source, _describe_folder(source, size, pictures), pictures)
    describe(name, path, size)  # the checks: shapes, dtypes, label counts
    arrays: dict[str, np.ndarray] = {}
    if source.is_dir():
        for key in IDX_FILES:
            if (file := _idx_file(source, key)) is not None:
                arrays[key] = _idx_read(file, key)
    else:
        with np.load(source, allow_pickle=False) as data:
            arrays = {key: data[key] for key in IDX_FILES if key in data}
    out: dict[str, np.ndarray] = {}
    for key, array in arrays.items():
        if key.startswith("x"):
            if array.dtype != np.uint8:
                raise ImageDataError(f"{source}: {key} holds {array.dtype}; 8-bit images (uint8) are expected")
            array = array[:, None] if array.ndim == 3 else array.transpose(0, 3, 1, 2)
            out[key] = np.ascontiguousarray(array)
        else:
            if not np.issubdtype(array.dtype, np.integer):
                raise ImageDataError(f"{source}: {key} holds {array.dtype}; integer class labels are expected")
            out[key] = array.astype(np.int64).reshape(-1)
    return out


# --- headers ------------------------------------------------------------------------------------------
def _shown(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _require(source: Path, shapes: dict[str, tuple[int, ...]], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in shapes]
    if missing:
        names = ", ".join(IDX_FILES[k] if source.is_dir() else k for k in missing)
        raise ImageDataError(f"{source}: no {names} (a dataset needs a train and a test split)")


def _image_shape(source: Path, key: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if len(shape) == 4 and shape[3] in (1, 3, 4):
        return (shape[3], shape[1], shape[2])
    raise ImageDataError(f"{source}: {key} has shape {_shown(shape)}; images are (n, H, W) or (n, H, W, C) with "
                         "C 1, 3 or 4")


def _npz_shapes(source: Path) -> dict[str, tuple[int, ...]]:
    if source.suffix != ".npz":
        raise ImageDataError(f"{source}: expected a .npz file or a directory of IDX files")
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ImageDataError(f"{source}: not a .npz archive ({exc})") from None
    shapes: dict[str, tuple[int, ...]] = {}
    with archive:
        for key in IDX_FILES:
            if f"{key}.npy" not in archive.namelist():
                continue
            with archive.open(f"{key}.npy") as member:
                try:
                    version = np.lib.format.read_magic(member)
                    shape, _, dtype = _npy_header(member, version)
                except ValueError as exc:
                    raise ImageDataError(f"{source}: {key} is not a numpy array ({exc})") from None
            if key.startswith("x") and dtype != np.uint8:
                raise ImageDataError(f"{source}: {key} holds {dtype}; 8-bit images (uint8) are expected")
            shapes[key] = shape
    _require(source, shapes, ("x_train", "x_test"))
    return shapes


def _npy_header(member: IO[bytes], version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    return np.lib.format.read_array_header_2_0(member)


def _idx_file(directory: Path, key: str) -> Path | None:
    for candidate in (directory / IDX_FILES[key], directory / f"{IDX_FILES[key]}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _open_idx(file: Path) -> IO[bytes]:
    """The file's bytes, through gzip where it is compressed (by its magic bytes, whatever its name)."""
    with open(file, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    if compressed:
        return gzip.open(file, "rb")  # type: ignore[return-value]  # a GzipFile reads bytes
    return open(file, "rb")  # noqa: SIM115 (returned to a with block)


def _idx_header(file: Path, key: str) -> tuple[np.dtype, tuple[int, ...]]:
    try:
        with _open_idx(file) as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_TYPES or not 1 <= magic[3] <= 4:
                raise ImageDataError(f"{file}: not an IDX file (its first bytes are {magic!r})")
            dims = tuple(int.from_bytes(handle.read(4), "big") for _ in range(magic[3]))
    except (OSError, EOFError) as exc:
        raise ImageDataError(f"{file}: cannot be read ({exc})") from None
    dtype = IDX_TYPES[magic[2]]
    if key.startswith("x") and dtype != np.uint8:
        raise ImageDataError(f"{file}: holds {dtype}; 8-bit images (uint8) are expected")
    return dtype, dims


def _idx_read(file: Path, key: str) -> np.ndarray:
    dtype, dims = _idx_header(file, key)
    with _open_idx(file) as handle:
        handle.read(4 + 4 * len(dims))
        data = handle.read()
    count = int(np.prod(dims))
    if len(data) < count * dtype.itemsize:
        raise ImageDataError(f"{file}: truncated ({len(data)} bytes of data for {_shown(dims)} values)")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(dims).copy()  # writable, as torch wants


# --- folders of PNG / JPEG files --------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _folder_files(source: Path) -> dict[str, list[tuple[Path, int]]]:
    """split -> [(file, label)], labels -1 where the split has no class subfolders."""
    splits = {split: source / split for split in ("train", "test")}
    missing = [split for split, folder in splits.items() if not folder.is_dir()]
    if missing:
        raise ImageDataError(f"{source}: no {' or '.join(f'{m}/' for m in missing)} subfolder (a folder of images "
                             "needs train/ and test/, each with images or one subfolder per class; or give IDX files)")
    classes = sorted(d.name for d in splits["train"].iterdir() if d.is_dir())
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in splits.items():
        if classes:
            extra = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes)
            if extra:
                raise ImageDataError(f"{folder}: classes {', '.join(extra)} are not among train/'s "
                                     f"({', '.join(classes)})")
            pairs = [(f, k) for k, c in enumerate(classes) for f in sorted((folder / c).iterdir())
                     if f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            pairs = [(f, -1) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
        if not pairs:
            raise ImageDataError(f"{folder}: no PNG or JPEG images")
        files[split] = pairs
    return files


Pictures = dict[str, list[tuple[Any, int]]]  # split -> [(a file or the image's bytes, label or -1)]


def _pictures(source: Path) -> Pictures | None:
    """The images of a folder or a Hugging Face directory, by split; None for arrays (.npz, IDX)."""
    if (source / "dataset_dict.json").is_file():
        return _hugging_face_files(source)
    if source.is_dir() and _idx_file(source, "x_train") is None:
        return _folder_files(source)
    return None


def _open_picture(item: Any) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)


def _describe_folder(source: Path, size: tuple[int, int] | None, files: Pictures) -> ImageFiles:
    from PIL import UnidentifiedImageError

    sizes: dict[tuple[int, int], str] = {}
    grey = True
    for pairs in files.values():
        for item, _ in pairs:
            where = item.name if isinstance(item, Path) else "an image"
            try:
                with _open_picture(item) as image:  # reads the header only
                    sizes.setdefault((image.height, image.width), where)
                    grey = grey and image.mode in ("L", "1", "I;16", "I")
            except (UnidentifiedImageError, OSError) as exc:
                raise ImageDataError(f"{item if isinstance(item, Path) else source}: not an image Pillow can read "
                                     f"({exc})") from None
    if size is None and len(sizes) > 1:
        (a, fa), (b, fb) = list(sizes.items())[:2]
        raise ImageDataError(f"{source}: images of several sizes ({fa} is {a[0]}x{a[1]}, {fb} is "
                             f"{b[0]}x{b[1]}); give dataset_kwargs.size: [H, W] to scale and crop them to one")
    height, width = size if size is not None else next(iter(sizes))
    return ImageFiles(source, (1 if grey else 3, height, width), len(files["train"]), len(files["test"]),
                      files["train"][0][1] >= 0)


def _read_folder(source: Path, info: ImageFiles, files: Pictures) -> dict[str, np.ndarray]:
    from PIL import Image

    channels, height, width = info.shape
    out: dict[str, np.ndarray] = {}
    for split, pairs in files.items():
        images = np.empty((len(pairs), channels, height, width), dtype=np.uint8)
        for i, (item, _) in enumerate(pairs):
            with _open_picture(item) as image:
                picture = image.convert("L" if channels == 1 else "RGB")
            if picture.size != (width, height):
                scale = max(width / picture.width, height / picture.height)
                scaled = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
                picture = picture.resize(scaled, Image.Resampling.BILINEAR)
                left, top = (picture.width - width) // 2, (picture.height - height) // 2
                picture = picture.crop((left, top, left + width, top + height))
            array = np.asarray(picture, dtype=np.uint8)
            images[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
        out[f"x_{split}"] = images
        if info.labels:
            out[f"y_{split}"] = np.array([label for _, label in pairs], dtype=np.int64)
    return out


# --- Hugging Face `datasets` directories (save_to_disk) ----------------------------------------------------
def _hugging_face_files(source: Path) -> Pictures:
    """split -> [(image bytes or file, label)] from a DatasetDict on disk: its Image and ClassLabel columns."""
    import json

    import pyarrow as pa

    try:
        splits = json.loads((source / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageDataError(f"{source}/dataset_dict.json: not a Hugging Face DatasetDict ({exc})") from None
    missing = [s for s in ("train", "test") if s not in splits]
    if missing:
        raise ImageDataError(f"{source}: the DatasetDict has splits {', '.join(splits)}; train and test are needed")
    out: Pictures = {}
    for split in ("train", "test"):
        folder = source / split
        try:
            features = json.loads((folder / "dataset_info.json").read_text())["features"]
            shards = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ImageDataError(f"{folder}: not a saved Hugging Face dataset split ({exc})") from None
        image = next((k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "Image"), None)
        if image is None:
            raise ImageDataError(f"{folder}: no column of type Image (columns: {', '.join(features)})")
        label = next((k for k, v in features.items() if isinstance(v, dict) and v.get("_type") == "ClassLabel"),
                     "label" if "label" in features else None)
        pairs: list[tuple[Any, int]] = []
        for shard in shards:
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(folder / shard))).read_all()
            except (OSError, pa.ArrowInvalid) as exc:
                raise ImageDataError(f"{folder / shard}: cannot be read as Arrow ({exc})") from None
            labels = table.column(label).to_pylist() if label else [-1] * table.num_rows
            for cell, y in zip(table.column(image).to_pylist(), labels, strict=True):
                if cell is None:
                    raise ImageDataError(f"{folder / shard}: an empty image cell")
                data = cell.get("bytes") if isinstance(cell, dict) else None
                item = data if data is not None else folder / str((cell or {}).get("path"))
                pairs.append((item, int(y) if y is not None else -1))
        if not pairs:
            raise ImageDataError(f"{folder}: no rows")
        out[split] = pairs
    return out
