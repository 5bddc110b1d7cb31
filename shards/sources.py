"""Sources for `hcsc-shards build`: parse ``KIND:...`` specs and enumerate labelled inputs.

Three kinds (docs/architecture.md#shards):
  - ``imagefolder:PATH``: one sub-folder per class (the ImageNet train layout); class ids follow the
    sorted folder names, empty folders included (so ids match the folder list) and reported.
  - ``imagenet-val:PATH,LABELS``: a flat folder of images plus a text file with one
    ``<file name> <class>`` pair per line, separated by white space or a comma; ``<class>`` is a class
    name (e.g. the synset ``n01440764``) or an integer id. The file name may omit its extension.
    Blank lines, ``#`` comments and Kaggle's ``ImageId,PredictionString`` header are ignored; for
    Kaggle's ``LOC_val_solution.csv`` the first word of the prediction string is the class. Class
    names are taken from ``class_names`` (the train split's, so ids agree) or else sorted.
  - ``fashion-mnist:DIR[:train|test]``: the gzipped idx files of the Debian package
    ``dataset-fashion-mnist``; without a part, split ``train`` reads ``train`` and others ``t10k``.
    The 28x28 grayscale pixels are written as RGB JPEG at ``--quality`` (default 95): a documented
    choice so that the demo runs the very decode path ImageNet shards take.
Every input that cannot become a sample is recorded in ``skipped`` with its reason, never dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# torchvision's IMG_EXTENSIONS plus .gif: what ImageFolder would have accepted.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
ARRAY_PREFIX = "#"  # inputs of array sources are "#<row>"


class SourceError(ValueError):
    """A source spec or path that cannot be used; the message names it and says what to do."""


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--source``: its kind and absolute paths.

    Attributes:
        kind: "imagefolder", "imagenet-val" or "fashion-mnist".
        path: the image folder (or the Fashion-MNIST folder).
        labels: imagenet-val only: the labels file.
        part: fashion-mnist only: "train" or "test".
    """

    kind: str
    path: str
    labels: str = ""
    part: str = ""

    def to_json(self) -> dict[str, str]:
        """The manifest's ``source`` (and part of the build fingerprint): the fields that apply."""
        return {k: v for k, v in asdict(self).items() if v}

    @classmethod
    def from_json(cls, d: dict[str, str]) -> SourceSpec:
        """The inverse of `to_json` (a manifest's ``source``)."""
        return cls(str(d["kind"]), str(d["path"]), labels=str(d.get("labels", "")),
                   part=str(d.get("part", "")))

    def to_arg(self) -> str:
        """The ``--source`` value that parses back to this spec (the Fashion-MNIST part explicit)."""
        if self.kind == "imagenet-val":
            return f"{self.kind}:{self.path},{self.labels}"
        if self.kind == "fashion-mnist":
            return f"{self.kind}:{self.path}:{self.part}"
        return f"{self.kind}:{self.path}"


@dataclass
class Listing:
    """Everything a build needs to know about its inputs before reading any image.

    Attributes:
        spec: the parsed source.
        class_names: class id -> name.
        inputs: per input, a path relative to ``spec.path``, or ``#<row>`` for array sources.
        labels: per input, its class id.
        skipped: ``{"input", "reason"}`` for inputs found but unusable before any decoding.
        empty_classes: class folders without a single image.
        digest: sha256 over inputs, labels and file sizes; a resumed build checks it is unchanged.
    """

    spec: SourceSpec
    class_names: list[str]
    inputs: list[str]
    labels: list[int]
    skipped: list[dict] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    digest: str = ""


SPEC_FORMS = "imagefolder:PATH, imagenet-val:PATH,LABELS or fashion-mnist:DIR[:train|test]"
FASHION_MNIST_PARTS = ("train", "test")


def parse_source(source: str, split: str) -> SourceSpec:
    """``KIND:ARGS`` -> `SourceSpec` with absolute paths; raises `SourceError` for bad specs or paths.

    Every message starts with ``--source '<spec>':`` and names the part of the spec that is wrong
    (the kind, the path, the labels file, the Fashion-MNIST part).
    """
    kind, sep, rest = source.partition(":")
    where = f"--source {source!r}"
    if not sep:
        raise SourceError(f"{where}: no KIND: prefix; expected {SPEC_FORMS}")
    if kind == "imagefolder":
        if not rest:
            raise SourceError(f"{where}: the folder path after 'imagefolder:' is empty; "
                              "expected imagefolder:PATH")
        return SourceSpec(kind, _existing(rest, where, "folder"))
    if kind == "imagenet-val":
        path, comma, labels = rest.rpartition(",")
        if not comma:
            raise SourceError(f"{where}: the labels file part is missing; expected imagenet-val:PATH,LABELS "
                              "(LABELS: a text file with one '<file name> <class>' per line)")
        if not path:
            raise SourceError(f"{where}: the image folder part (before the comma) is empty; "
                              "expected imagenet-val:PATH,LABELS")
        if not labels:
            raise SourceError(f"{where}: the labels file part (after the comma) is empty; "
                              "expected imagenet-val:PATH,LABELS")
        return SourceSpec(kind, _existing(path, where, "image folder"),
                          labels=_existing(labels, where, "labels file"))
    if kind == "fashion-mnist":
        return _fashion_mnist(rest, where, split)
    raise SourceError(f"{where}: unknown kind {kind!r}; use imagefolder, imagenet-val or fashion-mnist "
                      f"({SPEC_FORMS})")


def _fashion_mnist(rest: str, where: str, split: str) -> SourceSpec:
    """``DIR[:PART]``: an empty DIR is the Debian package's folder; no PART follows the split."""
    path, part = rest, ""
    head, sep, tail = rest.rpartition(":")
    if sep and tail in FASHION_MNIST_PARTS:
        path, part = head, tail
    elif sep and "/" not in tail and not Path(rest).expanduser().is_dir():  # a folder may hold a ':'
        raise SourceError(f"{where}: the part after the last ':' must be \"train\" or \"test\", got {tail!r} "
                          "(fashion-mnist:DIR[:train|test])")
    part = part or ("train" if split == "train" else "test")
    folder = _existing(path or DEFAULT_FASHION_MNIST, where, "folder")
    prefix = "train" if part == "train" else "t10k"
    for suffix in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        if not (Path(folder) / f"{prefix}-{suffix}").is_file():
            raise SourceError(f"{where}: {folder}/{prefix}-{suffix} does not exist; "
                              "install the Debian package dataset-fashion-mnist")
    return SourceSpec("fashion-mnist", folder, part=part)


def _existing(path: str, where: str, what: str) -> str:
    """The absolute path of an existing folder (`what` ends in "folder") or file, else `SourceError`."""
    p = Path(path).expanduser()
    folder = what.endswith("folder")
    if p.is_dir() if folder else p.is_file():
        return str(p.resolve())
    if not p.exists():
        raise SourceError(f"{where}: {what} {path} does not exist; check the path")
    actual = "a folder" if p.is_dir() else "a file" if p.is_file() else "not a regular file"
    raise SourceError(f"{where}: {what} {path} is {actual}, not a {'folder' if folder else 'file'}")


def list_inputs(spec: SourceSpec, *, class_names: list[str] | None = None) -> Listing:
    """Enumerate the inputs of a parsed source in a deterministic (sorted) order."""
    if spec.kind == "imagefolder":
        listing = _list_imagefolder(Path(spec.path), spec)
    elif spec.kind == "imagenet-val":
        listing = _list_imagenet_val(Path(spec.path), Path(spec.labels), spec, class_names)
    else:
        images, labels = load_fashion_mnist(spec.path, spec.part)
        listing = Listing(spec, list(FASHION_MNIST_CLASSES),
                          [f"{ARRAY_PREFIX}{i}" for i in range(len(labels))], labels.tolist())
        listing.digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        return listing
    listing.digest = _digest(Path(spec.path), listing)
    return listing


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _list_imagefolder(root: Path, spec: SourceSpec) -> Listing:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise SourceError(f"--source imagefolder:{root}: no class sub-folders; expected one folder per class")
    listing = Listing(spec, classes, [], [])
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir():
            listing.skipped.append({"input": entry.name, "reason": "not inside a class folder"})
        elif entry.name.startswith("."):
            listing.skipped.append({"input": entry.name, "reason": "hidden folder, not a class"})
    for cls, name in enumerate(classes):
        found = 0
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)  # once per folder: relpath costs ~20 us a call
            for fname in sorted(filenames):
                rel = os.path.join(rel_dir, fname)
                if _is_image(fname):
                    listing.inputs.append(rel)
                    listing.labels.append(cls)
                    found += 1
                else:
                    listing.skipped.append({"input": rel, "reason": "not an image file name"})
        if not found:
            listing.empty_classes.append(name)
    return listing


def _read_labels(labels_file: Path) -> list[tuple[str, str]]:
    pairs = []
    for lineno, line in enumerate(labels_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("ImageId,"):
            continue
        fields = re.split(r"[\s,]+", line)
        if len(fields) < 2:
            raise SourceError(f"{labels_file}:{lineno}: expected '<file name> <class>', got {line!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def _list_imagenet_val(root: Path, labels_file: Path, spec: SourceSpec,
                       class_names: list[str] | None) -> Listing:
    pairs = _read_labels(labels_file)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    files = [e.name for e in entries if e.is_file()]
    by_stem: dict[str, str] = {}
    name: str | None
    for name in files:
        by_stem.setdefault(os.path.splitext(name)[0], name)
    wanted = [c for _, c in pairs]
    if class_names is None:
        numeric = all(c.isdigit() for c in wanted)
        class_names = ([str(i) for i in range(max(map(int, wanted), default=-1) + 1)] if numeric
                       else sorted(set(wanted)))
    ids = {name: i for i, name in enumerate(class_names)}
    listing = Listing(spec, list(class_names), [], [])
    listing.skipped += [{"input": e.name, "reason": "a folder in the flat image folder"}
                        for e in entries if not e.is_file()]
    labelled: dict[str, int] = {}
    for fname, cls in pairs:
        name = fname if fname in files else by_stem.get(fname)
        cid = ids.get(cls, int(cls) if cls.isdigit() and int(cls) < len(class_names) else None)
        if name is None:
            listing.skipped.append({"input": fname, "reason": f"listed in {labels_file.name} but not found"})
        elif cid is None:
            listing.skipped.append({"input": name, "reason": f"unknown class {cls!r}"})
        elif name in labelled:
            listing.skipped.append({"input": name, "reason": f"listed twice in {labels_file.name}"})
        else:
            labelled[name] = cid
    for name in files:
        if name in labelled and _is_image(name):
            listing.inputs.append(name)
            listing.labels.append(labelled[name])
        elif name in labelled:
            listing.skipped.append({"input": name, "reason": "not an image file name"})
        else:
            listing.skipped.append({"input": name, "reason": f"no label in {labels_file.name}"})
    present = set(listing.labels)
    listing.empty_classes = [c for i, c in enumerate(class_names) if i not in present]
    return listing


def _digest(root: Path, listing: Listing) -> str:
    h, base = hashlib.sha256(), os.fspath(root)
    for rel, cls in zip(listing.inputs, listing.labels, strict=True):  # str joins: pathlib is slower
        h.update(os.fsencode(f"{rel}\0{cls}\0{os.stat(os.path.join(base, rel)).st_size}\n"))
    return h.hexdigest()


def _read_idx_gz(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data[:4], ">u4")[0]
    if header != magic:
        raise SourceError(f"{path}: not an idx file (magic {header:#x}); reinstall dataset-fashion-mnist")
    ndim = magic & 0xFF
    dims = np.frombuffer(data[4:4 + 4 * ndim], ">u4").astype(int)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def load_fashion_mnist(folder: str, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) from the gzipped idx files of `part`."""
    prefix = "train" if part == "train" else "t10k"
    images = _read_idx_gz(Path(folder) / f"{prefix}-images-idx3-ubyte.gz", 0x0803)
    labels = _read_idx_gz(Path(folder) / f"{prefix}-labels-idx1-ubyte.gz", 0x0801)
    if len(images) != len(labels):
        raise SourceError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
    return images, labels


def read_input(spec: SourceSpec, name: str) -> bytes | np.ndarray:
    """The raw bytes of a file input, or the uint8 [28, 28] pixels of an array input."""
    if spec.kind == "fashion-mnist":
        return load_fashion_mnist(spec.path, spec.part)[0][int(name[1:])]
    with open(os.path.join(spec.path, name), "rb") as f:
        return f.read()
