"""Finished rows of an evaluation, so that an interrupted run resumes without rescoring them.

Each rank appends to its own file, OUTPUT/partial/rank-NNNNN.jsonl, one line per scored chunk,
flushed and fsynced before the next chunk starts. A line is `CRC32 JSON\n` (the CRC, 8 hex digits,
of the JSON text), so a line cut short by a crash is recognised and dropped on resume:

    line 1:   {"format": 1, "fingerprint": {...}}          what the scores depend on (model, dtype, ...)
    line 2..: {"rows": [[id, chosen, rejected, row_hash], ...]}

Floats are written with Python's repr, so a resumed run reproduces the one-shot run's scores
bit for bit; a non-finite score is written as the string "nan", "inf" or "-inf" (every line is
strict JSON) and read back as that float. row_hash covers the row's texts, its system prompt and
the head that scored it: a resumed run that would score a finished row differently (the data or
the options changed) is an error, as is a fingerprint that differs (the run's --limit, the data
file's content, the model folder's content: see run.fingerprint). The files stay after a
successful run; `--resume` on a finished output only rewrites the final files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from themis_engine.errors import ResumeError
from themis_engine.fileio import atomic_write

FORMAT = 1
PARTIAL_DIR = "partial"



@dataclass(frozen=True)
class Finished:
    chosen: float
    rejected: float
    row_hash: str


def row_hash(pair, system: str | None, head: int) -> str:
    """A short hash of everything that decides a row's two scores besides the model."""
    key = json.dumps([pair.id, pair.prompt, pair.chosen, pair.rejected, system, head], ensure_ascii=False)
    return hashlib.blake2b(key.encode("utf8"), digest_size=8).hexdigest()


def _score(x: float) -> float | str:
    """A score as strict JSON holds it: the float, or "nan" / "inf" / "-inf" (float() reads them back)."""
    x = float(x)
    return x if math.isfinite(x) else repr(x)


def _encode(payload: dict) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    data = text.encode("utf8")
    return b"%08x " % zlib.crc32(data) + data + b"\n"


def _decode(line: bytes) -> dict | None:
    """The payload of a complete line, or None when its check fails."""
    crc, _, data = line.partition(b" ")
    try:
        if len(crc) != 8 or int(crc, 16) != zlib.crc32(data):
            return None
        payload = json.loads(data)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _scan(path: Path) -> tuple[dict | None, list[dict], int, bool]:
    """(header, chunk payloads, bytes of the valid lines, damaged) of one rank file.

    Only the last line may be damaged or cut short (a crash while appending); a damaged line before
    it is an error."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (a cut line) or b""
    header, chunks, good_bytes, damaged = None, [], 0, bool(tail)
    for i, line in enumerate(complete):
        payload = _decode(line)
        if payload is None:
            if i == len(complete) - 1 and not tail:
                damaged = True
                break
            raise ResumeError(f"{path}, line {i + 1}: damaged (its check fails); delete {path.parent} to start over")
        if i == 0:
            if payload.get("format") != FORMAT or "fingerprint" not in payload:
                raise ResumeError(f"{path}: not a partial-results file of format {FORMAT}")
            header = payload
        elif not isinstance(payload.get("rows"), list):
            raise ResumeError(f"{path}, line {i + 1}: a line without rows")
        else:
            chunks.append(payload)
        good_bytes += len(line) + 1
    return header, chunks, good_bytes, damaged


def _fingerprint_diff(found: dict, expected: dict, prefix: str = "") -> list[str]:
    """What differs between two fingerprints, one item per key (a nested mapping: per inner key)."""
    out = []
    for k in sorted(set(found) | set(expected)):
        a, b = found.get(k), expected.get(k)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and prefix == "":
            inner = _fingerprint_diff(a, b, prefix=f"{k}[")
            out.extend(inner)
        elif prefix:
            what = "absent then" if a is None else "absent now" if b is None else "content changed"
            out.append(f"{prefix}{k}]: {what}")
        else:
            out.append(f"{k}: {a!r} then, {b!r} now")
    return out


class PartialStore:
    """The partial-results files of one output directory; an instance appends for one rank."""

    def __init__(self, out_dir: str | os.PathLike, rank: int):
        self.dir = Path(out_dir) / PARTIAL_DIR
        self.path = self.dir / f"rank-{rank:05d}.jsonl"
        self._file = None

    # ------------------------------------------------------------------ whole directory (rank 0)
    @staticmethod
    def files(out_dir) -> list[Path]:
        d = Path(out_dir) / PARTIAL_DIR
        return sorted(d.glob("rank-*.jsonl")) if d.is_dir() else []

    @classmethod
    def reset(cls, out_dir) -> None:
        """Forget every finished row (a fresh run)."""
        for f in cls.files(out_dir):
            f.unlink()

    @classmethod
    def repair(cls, out_dir, fingerprint: dict) -> int:
        """Before resuming: check every file's fingerprint and drop lines cut short by a crash.
        Returns the number of finished rows found."""
        rows = 0
        for f in cls.files(out_dir):
            header, chunks, good_bytes, damaged = _scan(f)
            if header is None:  # crashed while writing the header: nothing in it
                f.unlink()
                continue
            diff = _fingerprint_diff(header["fingerprint"], fingerprint)
            if diff:
                raise ResumeError(
                    f"{f} was written by a run with other settings ({'; '.join(diff)}); run without --resume "
                    "to start over"
                )
            if damaged:
                keep = f.read_bytes()[:good_bytes]
                atomic_write(f, lambda tmp: Path(tmp).write_bytes(keep))
            rows += sum(len(c["rows"]) for c in chunks)
        return rows

    @classmethod
    def read_all(cls, out_dir, fingerprint: dict | None = None, strict: bool = True) -> dict[Any, Finished]:
        """id -> Finished over every rank file. strict=False: other ranks may be appending, so a
        last line cut short is skipped rather than an error."""
        found: dict[Any, Finished] = {}
        for f in cls.files(out_dir):
            header, chunks, _, damaged = _scan(f)
            if damaged and strict:
                raise ResumeError(f"{f}: the last line is cut short (a rank stopped while writing)")
            if header is None:
                continue
            if fingerprint is not None and _fingerprint_diff(header["fingerprint"], fingerprint):
                raise ResumeError(f"{f} was written by a run with other settings; run without --resume")
            for chunk in chunks:
                for rid, c, r, h in chunk["rows"]:
                    found.setdefault(rid, Finished(float(c), float(r), h))
        return found

    # ------------------------------------------------------------------ one rank's file
    def open(self, fingerprint: dict) -> "PartialStore":
        self.dir.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "ab")
        if new:
            self._write(_encode({"format": FORMAT, "fingerprint": fingerprint}))
        return self

    def append(self, ids: Sequence, chosen: Sequence[float], rejected: Sequence[float], hashes: Sequence[str]) -> None:
        rows = [[i, _score(c), _score(r), h] for i, c, r, h in zip(ids, chosen, rejected, hashes)]
        self._write(_encode({"rows": rows}))

    def _write(self, line: bytes) -> None:
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
