"""Files that every track writes, from the ground floor: strict JSON, atomic writes, provenance,
and a run folder that is built under a hidden partial name and renamed into place only when
complete. Imports nothing of mrplab above ``config`` and ``errors``.

A track's run folder subclasses ``RunFolder`` and adds its own ``finish``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import mrplab
from mrplab import config as config_mod
from mrplab.errors import MrplabError


def timestamp(now: _dt.datetime | None = None) -> str:
    return (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")


def jsonable(obj: Any) -> Any:
    """Strict-JSON-safe copy: NaN/inf become null, tensors and tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return jsonable(obj.tolist())
    return str(obj)


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file written by mrplab; unreadable or corrupt is one MrplabError naming ``what`` and the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MrplabError(f"{what} {path} does not exist", fix) from None
    except OSError as err:
        raise MrplabError(f"cannot read {what} {path}: {err.strerror or err}", fix) from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        raise MrplabError(f"{what} {path} is not valid JSON (truncated or edited?)", fix) from None


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_with(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path``."""
    tmp = _tmp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig: Any, path: Path, dpi: int = 120, tight: bool = True) -> Path:
    """A matplotlib figure as a PNG, written atomically (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda p: fig.savefig(p, dpi=dpi, format="png", **({"bbox_inches": "tight"} if tight else {})))
    return path


def git_commit(cwd: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the source tree mrplab is imported from; None if not a git checkout."""
    where = cwd or Path(mrplab.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as one shell-quoted line."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        return ""
    head = Path(args[0]).name
    if head == "__main__.py":
        head = "python -m mrplab"
        return " ".join([head, shlex.join(args[1:])]).strip()
    return shlex.join([head, *args[1:]])


def write_failure(err: OSError, where: Path, kept: Path | None, resume: str | None = None) -> MrplabError:
    """One error line for an OSError while writing a run (disk full, quota, permissions, read-only)."""
    target = err.filename or where
    what = f"cannot write {target}: {err.strerror or err}"
    if kept is not None:
        return MrplabError(f"{what}; the run so far is kept in {kept}",
                           f"free space, then continue with {resume or '--resume'} {kept}")
    return MrplabError(what, "free disk space or choose another --out; nothing of this run was kept")


class RunFolder:
    """A run folder under construction; a context manager that removes it on failure.

    Named ``<cfg.name>[-<label>]-<YYYYmmdd-HHMMSS>``, built as ``.<name>.<pid>.partial`` beside it,
    with config.yaml, figures/, checkpoints/ and a streamed metrics.jsonl; a subclass's ``finish``
    writes the rest and calls ``close_metrics`` and ``rename_into_place``. ``cfg`` is any config
    with ``name`` and ``hash()``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        cfg: Any,
        command: str | None = None,
        now: _dt.datetime | None = None,
        label: str | None = None,
    ):
        self.cfg = cfg
        self.parent = Path(out_dir)
        self.started = now or _dt.datetime.now()
        self.name = "-".join([cfg.name, *([label] if label else []), timestamp(self.started)])
        self.partial = self.parent / f".{self.name}.{os.getpid()}.partial"
        self.final: Path | None = None
        self.command = command if command is not None else command_line()
        self._metrics = None
        self._t0 = time.perf_counter()
        self.provenance = {
            "config_hash": cfg.hash(),
            "git_commit": git_commit(),
            "command": self.command,
            "created": self.started.isoformat(timespec="seconds"),
        }

    # -- lifecycle

    def __enter__(self) -> "RunFolder":
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            if self.partial.exists():
                shutil.rmtree(self.partial)
            self.partial.mkdir()
        except OSError as err:
            raise MrplabError(
                f"cannot create a run folder under {self.parent}: {err.strerror or err}", "choose a writable --out"
            ) from None
        try:
            (self.partial / "figures").mkdir()
            (self.partial / "checkpoints").mkdir()
            atomic_write_text(self.partial / "config.yaml", config_mod.dump_yaml(self.cfg))
            self._metrics = open(self.partial / "metrics.jsonl.tmp", "w", encoding="utf-8")
        except BaseException:
            self._discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None or self.final is None:
            self._discard()
        if exc_type is not None and issubclass(exc_type, OSError):
            raise write_failure(exc, self.parent, None) from None
        return False

    def _close_metrics(self) -> None:
        if self._metrics is not None:
            metrics, self._metrics = self._metrics, None
            try:
                metrics.close()
            except OSError:  # a full disk fails the last flush too; the caller reports the first failure
                pass

    def _discard(self) -> None:
        self._close_metrics()
        shutil.rmtree(self.partial, ignore_errors=True)

    # -- streaming

    def emit(self, record: dict) -> None:
        """Append one logged record to metrics.jsonl (the experiment's ``emit`` callback)."""
        if self._metrics is None:
            raise RuntimeError("RunFolder.emit called outside its with-block")
        self._metrics.write(dumps(record) + "\n")
        self._metrics.flush()

    # -- finishing

    def close_metrics(self) -> None:
        """Close the metrics stream and move metrics.jsonl into place inside the partial folder."""
        self._close_metrics()
        os.replace(self.partial / "metrics.jsonl.tmp", self.partial / "metrics.jsonl")

    def rename_into_place(self) -> Path:
        for i in range(1000):
            target = self.parent / (self.name if i == 0 else f"{self.name}-{i}")
            if target.exists():
                continue
            try:
                os.rename(self.partial, target)
            except OSError:
                if target.exists():  # lost a race with another run of the same name and second
                    continue
                raise
            return target
        raise MrplabError(f"too many run folders named {self.name} in {self.parent}", "use another --out or name")
