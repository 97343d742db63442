"""ImageFolder trees: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``, decoded once with PIL
(several threads), fitted to ``image_size``, and cached as safetensors keyed by the files."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mrplab import memory
from mrplab.errors import MrplabError
from mrplab.vision.data.base import ImageSet, ProgressFn, Split, VisionDataConfig, expand_root

CACHE_VERSION = 1
PROGRESS_MIN_IMAGES = 5000  # decoding fewer images than this shows no progress by default

_LAYOUT_HINT = "the folder source expects ROOT/train/<class>/*.png|jpg and ROOT/test/<class>/*"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mrplab"


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _scan(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) of one split, with the checks that name the fix."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    split_dir = root / split
    if not split_dir.is_dir():
        raise MrplabError(f"data root {root} has no {split}/ folder", _LAYOUT_HINT)
    try:
        classes, class_to_idx = find_classes(split_dir)
    except FileNotFoundError:
        raise MrplabError(f"no class folders in {split_dir}", _LAYOUT_HINT) from None
    samples = make_dataset(split_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([y for _, y in samples], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise MrplabError(
            f"class folder(s) {', '.join(empty)} in {split_dir} hold no image files",
            f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the empty class folders from train/ and test/",
        )
    return classes, samples


def _decode(path: str, size: int) -> np.ndarray:
    """One image as [size, size, 3] uint8; raises on anything unreadable."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = im.convert("RGB")  # forces the full decode (truncated files fail here)
        if im.size != (size, size):
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


def _reason(err: Exception, path: str) -> str:
    """One-line reason why ``path`` could not be decoded."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except OSError:
        pass
    msg = " ".join(str(err).replace(f"'{path}'", "").replace(path, "").split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _decode_chunk(paths: Sequence[str], size: int) -> tuple[np.ndarray, list[str | None]]:
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors: list[str | None] = []
    for k, p in enumerate(paths):
        try:
            out[k] = _decode(p, size)
            errors.append(None)
        except Exception as err:  # any unreadable file is skipped, never fatal
            errors.append(_reason(err, p))
    return out, errors


class _StderrProgress:
    """Default decode progress: a rich bar when stderr is a terminal, a plain line every ~10% otherwise."""

    def __init__(self, what: str):
        self.what = what
        self.t0 = time.perf_counter()
        self.next_pct = 10
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.what, markup=False), BarColumn(), MofNCompleteColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("", total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
            if done >= total:
                self.bar.stop()
            return
        pct = 100 * done // max(total, 1)
        if pct >= self.next_pct or done >= total:
            el = time.perf_counter() - self.t0
            eta = el / max(done, 1) * (total - done)
            print(f"{self.what}: {done}/{total} images ({pct}%), {el:.0f} s elapsed, eta {eta:.0f} s",
                  file=sys.stderr, flush=True)
            self.next_pct = pct - pct % 10 + 10


def decode_files(paths: Sequence[str], size: int, progress: ProgressFn | None = None,
                 threads: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Decode ``paths`` in order: ([N, size, size, 3] uint8, per-file error or None). Failed rows are zero."""
    n = len(paths)
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    errors: list[str | None] = [None] * n
    step = 512
    starts = list(range(0, n, step))
    workers = threads or min(4, os.cpu_count() or 1)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_decode_chunk, paths[a:a + step], size) for a in starts]
        for a, fut in zip(starts, futures):
            arr, errs = fut.result()
            out[a:a + len(errs)] = arr
            errors[a:a + len(errs)] = errs
            done += len(errs)
            if progress is not None:
                progress(done, n)
    return out, errors


def _cache_key(root: Path, split: str, size: int, samples: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, str(root), split, size]).encode())
    base = root / split
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, base)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path, classes: list[str]) -> tuple[ImageSet, list[tuple[str, str]]] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if json.loads(meta["classes"]) != classes:
                return None
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
            skipped = [tuple(x) for x in json.loads(meta["skipped"])]
    except Exception:  # a missing, foreign or damaged cache file is rebuilt
        return None
    return ImageSet(images=images, labels=labels, classes=classes, skipped=len(skipped)), skipped


def _write_cache(path: Path, data: ImageSet, skipped: list[tuple[str, str]]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"classes": json.dumps(data.classes), "skipped": json.dumps(skipped), "version": str(CACHE_VERSION)}
        save_file({"images": data.images.contiguous(), "labels": data.labels.contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as err:
        _warn(f"could not write the decoded-image cache {path} ({err.strerror or err}); the next load decodes again")
    finally:
        tmp.unlink(missing_ok=True)


def cache_path(cfg: VisionDataConfig, split: Split) -> Path:
    """Where ``load_split`` caches (or finds) the decoded folder split."""
    root = _folder_root(cfg)
    return _cache_file(cfg, root, split, _scan(root, split)[1])


def _cache_file(cfg: VisionDataConfig, root: Path, split: Split, samples: list[tuple[str, int]]) -> Path:
    key = _cache_key(root, split, cfg.image_size, samples)
    base = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return base / "images" / f"{root.name}-{split}-{cfg.image_size}px-{key}.safetensors"


def _folder_root(cfg: VisionDataConfig) -> Path:
    if not cfg.root:
        raise MrplabError("the folder source needs a root", "set root to an ImageFolder folder with train/ and test/")
    root = Path(expand_root(cfg.root)).expanduser().resolve()
    if not root.is_dir():
        raise MrplabError(f"data root {root} does not exist or is not a folder", _LAYOUT_HINT)
    return root


def folder_split(cfg: VisionDataConfig, split: Split, progress: ProgressFn | None) -> ImageSet:
    """One split of an ImageFolder tree, from the cache when the files are unchanged."""
    root = _folder_root(cfg)
    scans = {s: _scan(root, s) for s in ("train", "test")}
    train_cls, test_cls = scans["train"][0], scans["test"][0]
    if train_cls != test_cls:
        only_train = sorted(set(train_cls) - set(test_cls)) or "-"
        only_test = sorted(set(test_cls) - set(train_cls)) or "-"
        raise MrplabError(
            f"train and test class folders differ under {root} "
            f"(only in train: {only_train}; only in test: {only_test})",
            "give train/ and test/ the same class folders",
        )
    classes, samples = scans[split]
    size = cfg.image_size
    memory.check({"images": 2.0 * len(samples) * 3 * size * size},  # the decode buffer and the tensor
                 f"data.image_size or the number of files under {root / split}")
    cache = _cache_file(cfg, root, split, samples)
    cached = _read_cache(cache, classes) if cache.is_file() else None
    if cached is not None:
        data, skipped = cached
        for path, reason in skipped:
            _warn(f"skipped unreadable image {path} ({reason})")
        return data

    data, skipped = _decode_split(cfg, root / split, classes, samples, progress)
    _write_cache(cache, data, skipped)
    return data


def _decode_split(cfg: VisionDataConfig, split_dir: Path, classes: list[str], samples: list[tuple[str, int]],
                  progress: ProgressFn | None) -> tuple[ImageSet, list[tuple[str, str]]]:
    """Decode every file of a split; (the readable images, [(path, why)] of the skipped ones)."""
    paths = [p for p, _ in samples]
    if progress is None and len(paths) >= PROGRESS_MIN_IMAGES:
        progress = _StderrProgress(f"decoding {split_dir}")
    arr, errors = decode_files(paths, cfg.image_size, progress)
    ok = np.array([e is None for e in errors], dtype=bool)
    skipped = [(p, e) for p, e in zip(paths, errors) if e is not None]
    for path, reason in skipped:
        _warn(f"skipped unreadable image {path} ({reason})")
    labels = np.array([y for _, y in samples], dtype=np.int64)
    readable = np.bincount(labels[ok], minlength=len(classes))
    if (readable == 0).any():
        bad = ", ".join(classes[i] for i in np.flatnonzero(readable == 0))
        raise MrplabError(f"class folder(s) {bad} in {split_dir} hold no readable images",
                          "replace the damaged files or remove the class from train/ and test/")
    kept = arr if ok.all() else arr[ok]  # [N, S, S, 3]
    images = torch.from_numpy(kept).permute(0, 3, 1, 2).contiguous()  # [N, 3, S, S]
    data = ImageSet(images=images, labels=torch.from_numpy(labels[ok]), classes=classes, skipped=len(skipped))
    return data, skipped

