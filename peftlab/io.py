"""Ground floor: files written safely and text read clearly. Atomic text and strict JSON, whole CSV
tables, append-only CSV logs, the disk-full error, the check that an output directory can be
written, and :func:`read_text`, the UTF-8 reader whose errors name the file and its encoding.

No peftlab imports but :mod:`peftlab.errors`."""

from __future__ import annotations

import codecs
import csv
import errno
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from .errors import PeftlabError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}  # a full disk or quota


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():  # e.g. a sharded checkpoint's torch.distributed.checkpoint directories
            _fsync_tree(f)
    _fsync_dir(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file via a temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in _NO_SPACE:
            raise
        tmp.unlink(missing_ok=True)
        raise disk_full_error(path, len(text.encode()), e) from None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# what libraries that do their own I/O (safetensors in Rust, torch's C++ zip writer) say instead of
# raising OSError: safetensors words the OS error; torch's writer does not, see is_out_of_space
_NO_SPACE_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_TORCH_WRITER_WORDS = ("PytorchStreamWriter", "inline_container", "file write failed")


def is_out_of_space(e: BaseException, where: Optional[Path] = None) -> bool:
    """Whether ``e``, raised while writing under ``where``, means the disk (or quota) is full.

    An OSError says so by its errno; safetensors raises ``SafetensorError`` with the OS message
    ("No space left on device (os error 28)"); torch's zip writer raises a ``RuntimeError`` that
    names no cause ("[enforce fail at inline_container.cc] unexpected pos ..."), so for that
    one the file system under ``where`` is asked: less than 1 MiB free counts as full."""
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE
    msg = str(e)
    if any(w in msg for w in _NO_SPACE_WORDS):
        return True
    if where is None or not any(w in msg for w in _TORCH_WRITER_WORDS):
        return False
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free < (1 << 20)
    except OSError:
        return False


def disk_full_error(path: Path, need_bytes: Optional[int], e: BaseException) -> PeftlabError:
    """A clear error for a save that ran out of space (or quota): the path, the free and needed space.
    ``e`` is the OSError, or the library's error that :func:`is_out_of_space` recognised."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
        free_s = f"{_human(free)} free"
    except OSError:
        free_s = "free space unknown"
    need = f"; this save needs about {_human(need_bytes)}" if need_bytes else ""
    return PeftlabError(
        f"No space left on the device while writing {path} ({getattr(e, 'strerror', None) or e}; {free_s} on {probe}{need}). "
        "Free some space (older runs, checkpoints: lower training.save_total_limit) or choose another output.dir, "
        "then continue with --training.resume_from=latest."
    )


def to_strict_json(o: Any) -> Any:
    """A copy of ``o`` that ``json.dumps(..., allow_nan=False)`` accepts: NaN and +-inf become None
    (JSON null), tensors and numpy scalars become Python numbers, paths strings."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: to_strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_strict_json(v) for v in o]
    if o is None or isinstance(o, (str, bool, int)):
        return o
    if hasattr(o, "tolist"):  # tensors, numpy arrays and scalars
        return to_strict_json(o.tolist())
    if hasattr(o, "item"):
        return to_strict_json(o.item())
    return str(o)


def strict_json_dumps(data: Any, **kw: Any) -> str:
    """JSON text with no bare NaN/Infinity (RFC 8259): non-finite numbers are written as null."""
    return json.dumps(to_strict_json(data), allow_nan=False, **kw)


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically: NaN and +-inf become null (no bare NaN/Infinity that
    other JSON readers reject), tensors and numpy numbers become plain numbers."""
    atomic_write_text(Path(path), strict_json_dumps(data, indent=2) + "\n")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Write a whole table atomically (empty cell for None); for result tables, not append logs."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    atomic_write_text(Path(path), buf.getvalue())


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return str(o)


class CsvLog:
    """An append-only CSV whose header is fixed by the first row (or given)."""

    def __init__(self, path: Path, columns: Optional[list[str]] = None):
        self.path = Path(path)
        self.columns = columns

    def truncate_after(self, step: int) -> None:
        """Keep rows with ``step <= step`` (and drop a torn last line); used on resume."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            lines = f.read().splitlines(keepends=True)
        if not lines:
            return
        header = next(csv.reader([lines[0]]))
        self.columns = header
        keep = [lines[0] if lines[0].endswith("\n") else lines[0] + "\n"]
        si = header.index("step")
        for line in lines[1:]:
            if not line.endswith("\n"):
                break  # torn write
            row = next(csv.reader([line]))
            if len(row) != len(header):
                break
            if int(row[si]) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(keep))

    def write(self, row: dict[str, Any]) -> None:
        new = not self.path.is_file() or self.path.stat().st_size == 0
        if self.columns is None:
            self.columns = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            if new:
                w.writerow(self.columns)
            w.writerow([_fmt(row.get(c)) for c in self.columns])
            f.flush()


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.8g}"
    return str(v)


def output_path_problem(path: str) -> Optional[str]:
    """Why a directory could not be created or written at ``path`` (None when it can): a file in the
    way, a parent that is not a directory, no write permission, a read-only file system."""
    p = Path(os.path.expanduser(path)).absolute()
    if p.exists():
        if not p.is_dir():
            return f"{p} exists and is a file; choose a directory path."
        probe = p
    else:
        probe = p.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            return f"{p} cannot be created: {probe} is a file, not a directory."
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{p} cannot be written: no write permission in {probe}. Choose a directory you can write to."
    try:
        st = os.statvfs(probe)
        if st.f_flag & getattr(os, "ST_RDONLY", 1):
            return f"{p} cannot be written: {probe} is on a read-only file system."
    except OSError as e:
        if e.errno != errno.ENOSYS:
            return f"{p} cannot be used: {e.strerror}."
    return None


# ------------------------------------------------------------------------------ reading text
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),  # before UTF-16: FF FE 00 00 starts with FF FE
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def foreign_encoding(head: bytes) -> Optional[str]:
    """The encoding the first bytes of a file reveal when it is UTF-16 or UTF-32 (a byte-order mark,
    or NUL bytes between the characters), else None. Plain UTF-8 and ASCII never hold NUL."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    sample = head[:4096]
    if sample and sample.count(0) * 4 >= len(sample):
        return "UTF-16 or UTF-32 (no byte-order mark)"
    return None


def _encoding_error(path: Path, what: str, encoding: str) -> PeftlabError:
    return PeftlabError(f"{what} {path} is encoded as {encoding}, but peftlab reads text files as UTF-8. Convert it, e.g. "
                        f"`iconv -f {encoding.split()[0]} -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`, or save it as UTF-8 "
                        "from your editor or spreadsheet, and give the converted file.")


def check_text_head(path: Path, what: str = "file") -> None:
    """Refuse a UTF-16/UTF-32 file from its first bytes (for readers that stream a file line by line)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    enc = foreign_encoding(head)
    if enc is not None:
        raise _encoding_error(path, what, enc)


def read_text(path: Path, what: str = "file", errors: str = "strict") -> str:
    """A whole text file read as UTF-8, for every reader of user files.

    A UTF-16 or UTF-32 file is a :class:`PeftlabError` naming the file and the encoding. With
    ``errors="strict"`` so is invalid UTF-8, naming the line and byte; ``errors="replace"`` reads
    stray bad bytes as U+FFFD (for data readers that count them). ``what`` names the file in the
    message ("study file", "instruction data file", ...)."""
    path = Path(path)
    data = path.read_bytes()
    enc = foreign_encoding(data[:4096])
    if enc is not None:
        raise _encoding_error(path, what, enc)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PeftlabError(f"{what} {path} is not valid UTF-8: byte 0x{data[e.start]:02x} on line {line} (offset {e.start}) "
                           "cannot be decoded; peftlab reads text files as UTF-8. Convert the file (e.g. a Latin-1 file with "
                           f"`iconv -f LATIN1 -t UTF-8 {path} > {path.stem}.utf8{path.suffix}`) or remove that byte.") from None
