"""The token store: a split's tokenized pairs on disk, written once, read a pair at a time.

    store = build_store(folder, pairs, tokenizer, max_length, systems, criteria, workers=8)
    store = TokenStore(folder)           # later runs, every rank: opens the files, reads no row
    p = store[i]                         # StoredPair: chosen_ids / rejected_ids are int32 arrays

A store is a folder:

    manifest.json        written last: format, key, counts, stats, the files and their sizes
    tokens.int32         every sequence's ids, flat: pair i's chosen, then its rejected
    offsets.npy          int64 [2n + 1]: sequence j is tokens[offsets[j]:offsets[j + 1]]
    <column>.npy         one value per pair: chosen_response_start, rejected_response_start,
                         chosen_target_end, prefix_len (common token prefix of the two sides),
                         aspect_index, language (code into manifest["languages"]), margin,
                         truncated, index (the pair's position in the list it was built from)

It is built in a temporary folder and renamed into place, so a folder with a manifest is complete;
`TokenStore` checks the files against the manifest when it opens them. The per-pair columns and
offsets are memory-mapped (a few dozen bytes a pair); the token file is read pair by pair with
pread, never mapped (TokenStore.read_tokens): host memory while training is the batch in hand,
independent of the data set's size, and no Python list of token ids exists.

Building tokenizes shards of pairs in worker processes (the chat path, themis_engine.chat, the same
code as `tokenize_pairs`), each shard written to `<folder>.partial/` as it completes, and merges
them in order: the store is the same for any number of workers, and a killed build resumes from
the shards already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from themis_engine import chat
from themis_engine.data.tokenize import OVERFLOW_POLICIES, _tokenize_chunk
from themis_engine.errors import DataError

logger = logging.getLogger("themis_engine")

FORMAT = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.int32"
ENCODE_PAIRS = 128  # pairs encoded at a time inside a shard (bounds the tokenizer's transient memory)
COLUMNS = {  # name -> dtype of the per-pair columns
    "chosen_response_start": np.int32, "rejected_response_start": np.int32, "chosen_target_end": np.int32,
    "prefix_len": np.int32, "aspect_index": np.int32, "language": np.int32, "margin": np.float64,
    "truncated": np.bool_, "index": np.int64,
}


@dataclass(frozen=True)
class StoredPair:
    """One pair of a store (the fields of data.TokenizedPair); the ids are read-only int32 views."""

    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    chosen_response_start: int
    rejected_response_start: int
    chosen_target_end: int
    prefix_len: int
    aspect_index: int
    margin: float
    language: str | None
    truncated: bool
    index: int


class TokenStore(Sequence):
    """A built store, memory-mapped (read-only). A sequence of StoredPair."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{self.folder}: not a token store (no {MANIFEST})") from None
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable ({err})") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{path}: store format {self.manifest.get('format')!r}, this version reads {FORMAT}")
        for name, size in self.manifest["files"].items():
            f = self.folder / name
            if not f.is_file() or f.stat().st_size != size:
                raise DataError(f"{f}: missing or not the size its manifest says ({size} bytes)")
        n, n_tokens = self.manifest["pairs"], self.manifest["tokens"]
        self._fd: tuple[int, int] | None = None  # (pid, descriptor) of the token file, opened on first read
        self.offsets = np.load(self.folder / "offsets.npy", mmap_mode="r")
        self.columns = {c: np.load(self.folder / f"{c}.npy", mmap_mode="r") for c in COLUMNS}
        if len(self.offsets) != 2 * n + 1 or int(self.offsets[-1]) != n_tokens or any(
                len(v) != n for v in self.columns.values()):
            raise DataError(f"{self.folder}: arrays do not match the manifest ({n} pairs, {n_tokens} tokens)")
        self.languages: list[str | None] = list(self.manifest["languages"])

    def __len__(self) -> int:
        return self.manifest["pairs"]

    def __getitem__(self, i: int) -> StoredPair:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} of a store of {n}")
        i %= n
        o, c = self.offsets, self.columns
        a, b, e = int(o[2 * i]), int(o[2 * i + 1]), int(o[2 * i + 2])
        ids = self.read_tokens(a, e)
        return StoredPair(
            chosen_ids=ids[: b - a], rejected_ids=ids[b - a :],
            chosen_response_start=int(c["chosen_response_start"][i]),
            rejected_response_start=int(c["rejected_response_start"][i]),
            chosen_target_end=int(c["chosen_target_end"][i]), prefix_len=int(c["prefix_len"][i]),
            aspect_index=int(c["aspect_index"][i]), margin=float(c["margin"][i]),
            language=self.languages[int(c["language"][i])], truncated=bool(c["truncated"][i]),
            index=int(c["index"][i]),
        )

    def read_tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens start..stop-1 of the flat token file, read with one pread (int32). The token file is
        read, never mapped: a mapping would count every page a run touched (and the kernel's
        read-ahead around it) in the process's resident memory, which then grows with the data set
        over an epoch; read pages stay in the page cache, shared by the ranks, and cost no RSS."""
        if stop <= start:
            return np.zeros(0, np.int32)
        pid = os.getpid()
        if self._fd is None or self._fd[0] != pid:  # first read, or a forked child: its own descriptor
            self._fd = (pid, os.open(self.folder / TOKENS, os.O_RDONLY))
        want = 4 * (stop - start)
        buf = os.pread(self._fd[1], want, 4 * start)
        if len(buf) != want:
            raise DataError(f"{self.folder / TOKENS}: {len(buf)} bytes where {want} were expected at token {start} "
                            "(the file changed after the store was opened)")
        return np.frombuffer(buf, dtype=np.int32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # a descriptor does not travel to another process

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None and fd[0] == os.getpid():
            try:
                os.close(fd[1])
            except OSError:
                pass

    def __iter__(self) -> Iterator[StoredPair]:
        for i in range(len(self)):
            yield self[i]

    @property
    def stats(self) -> dict:
        """The tokenization's counts (as tokenize_pairs' stats), as built."""
        return dict(self.manifest["stats"])

    @property
    def extra(self) -> dict:
        """What the builder stored beside the tokens (e.g. the source files' load report)."""
        return dict(self.manifest.get("extra", {}))


def is_built(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def open_store(folder: str | os.PathLike) -> TokenStore | None:
    """The store at folder, or None when there is none or it does not verify (logged)."""
    if not is_built(folder):
        return None
    try:
        return TokenStore(folder)
    except (DataError, OSError, ValueError) as err:
        logger.warning("token store %s is damaged, building it again: %s", folder, err)
        return None


def settings_key(settings: dict) -> str:
    """The store's key: a hash of everything that decides its tokens (JSON-able settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: str | os.PathLike, block: int = 1 << 23) -> dict:
    """A data file's identity for the store's key: its path, size and a BLAKE2b hash of its bytes."""
    p = Path(path)
    h = hashlib.blake2b(digest_size=20)
    with open(p, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return {"path": str(p.resolve()), "size": p.stat().st_size, "blake2b": h.hexdigest()}


def source_fingerprint(source: str) -> dict:
    """A data source's identity: a file's content (file_fingerprint), a folder written by datasets'
    save_to_disk (each of its files'), or a dataset id as given (the hub's own cache keys it)."""
    p = Path(source)
    if p.is_file():
        return file_fingerprint(p)
    if p.is_dir():
        return {"folder": str(p.resolve()),
                "files": [file_fingerprint(f) for f in sorted(p.rglob("*")) if f.is_file()]}
    return {"dataset": str(source)}


def build_store(
    folder: str | os.PathLike,
    pairs: Sequence,
    tokenizer,
    max_length: int,
    system_prompts: Sequence[str | None],
    criteria: Sequence[str] | None,
    on_overflow: str = "truncate",
    workers: int = 1,
    shard_pairs: int = 2048,
    key: str = "",
    extra: dict | None = None,
    progress: bool = True,
) -> TokenStore:
    """Tokenize `pairs` (data.PreferencePair) into a store at `folder` and open it. As
    tokenize_pairs: system_prompts, one per pair; criteria: the run's criteria (aspect_index);
    on_overflow: "truncate" / "skip" / "error". workers: processes (1: in this one). key: written to
    the manifest (the caller's settings_key). extra: JSON-able data kept in the manifest."""
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
    if len(system_prompts) != len(pairs):
        raise ValueError(f"{len(system_prompts)} system prompts for {len(pairs)} pairs")
    folder = Path(folder)
    criteria = None if criteria is None else list(criteria)
    aspect_of = {c: i for i, c in enumerate(criteria or ())}
    for p in pairs if criteria is not None else ():
        if p.aspect is not None and p.aspect not in aspect_of:
            raise DataError(f"{p.source or 'a pair'}: aspect {p.aspect!r} is not among the run's criteria {criteria}")
    t0 = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    settings = dict(max_length=int(max_length), on_overflow=on_overflow, aspect_of=aspect_of)
    shards = [(k, lo, min(lo + shard_pairs, len(pairs))) for k, lo in enumerate(range(0, len(pairs), shard_pairs))]
    todo = [s for s in shards if _read_shard(_shard_path(partial, s[0])) is None]
    if len(todo) < len(shards):
        logger.info("token store %s: %d of %d shards already written, resuming", folder, len(shards) - len(todo),
                    len(shards))
    _run_shards(partial, todo, pairs, system_prompts, tokenizer, settings, workers, progress,
                done=sum(hi - lo for _, lo, hi in shards) - sum(hi - lo for _, lo, hi in todo), total=len(pairs))
    store = _merge(folder, partial, [k for k, _, _ in shards], key, extra or {}, len(pairs))
    shutil.rmtree(partial, ignore_errors=True)
    logger.info("token store %s: %d pairs, %d tokens in %.1f s", folder, len(store), store.manifest["tokens"],
                time.perf_counter() - t0)
    return store


# ---------------------------------------------------------------------------------------- shards
def _shard_path(partial: Path, k: int) -> Path:
    return partial / f"shard-{k:06d}.npz"


def _run_shards(partial, todo, pairs, systems, tokenizer, settings, workers, progress, done, total) -> None:
    bar = _progress(total, done, progress)
    try:
        if workers <= 1 or len(todo) <= 1:
            for k, lo, hi in todo:
                n = _tokenize_shard(partial, k, pairs[lo:hi], systems[lo:hi], lo, tokenizer, settings)
                bar.update(n)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # fork where there is one (no re-import of the caller's __main__, no start-up cost; the workers
        # run the tokenizer only, never torch); each worker gets the tokenizer once
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context(method),
                                 initializer=_init_worker, initargs=(tokenizer, settings)) as pool:
            futures = [pool.submit(_worker_shard, str(partial), k, list(pairs[lo:hi]), list(systems[lo:hi]), lo)
                       for k, lo, hi in todo]
            for fut in as_completed(futures):
                bar.update(fut.result())
    finally:
        bar.close()


def _progress(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="pair", desc="tokenizing", disable=not enabled, smoothing=0.1,
                dynamic_ncols=True)


_WORKER: dict = {}


def _init_worker(tokenizer, settings) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker process
    _WORKER.update(tokenizer=tokenizer, settings=settings)


def _worker_shard(partial: str, k: int, pairs, systems, lo: int) -> int:
    return _tokenize_shard(Path(partial), k, pairs, systems, lo, _WORKER["tokenizer"], _WORKER["settings"])


def _tokenize_shard(partial: Path, k: int, pairs, systems, lo: int, tokenizer, settings) -> int:
    """Tokenize one shard and write it (atomically); returns its number of pairs. The shard is
    encoded in pieces of ENCODE_PAIRS pairs, each turned into arrays at once: the tokenizer's
    per-token objects and the Python lists of ids never exist for more than one piece (at 2048 pairs
    at a time they made a 1.9 GiB peak; 0.6 GiB at 128)."""
    stats = dict(pairs=len(pairs), kept=0, truncated=0, skipped_overflow=0, skipped_identical=0, tokens=0)
    pieces: list[np.ndarray] = []
    lengths_parts: list[np.ndarray] = []
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    languages: list = []
    code: dict = {}
    for a in range(0, len(pairs), ENCODE_PAIRS):
        out = _tokenize_chunk(pairs, range(a, min(a + ENCODE_PAIRS, len(pairs))), tokenizer, settings["max_length"],
                              systems, settings["aspect_of"], settings["on_overflow"], stats)
        seqs = [s for t in out for s in (t.chosen_ids, t.rejected_ids)]
        lengths_parts.append(np.array([len(s) for s in seqs], dtype=np.int64))
        pieces.extend(np.asarray(s, dtype=np.int32) for s in seqs)
        for t in out:
            if t.language not in code:
                code[t.language] = len(languages)
                languages.append(t.language)
            cols["chosen_response_start"].append(t.chosen_response_start)
            cols["rejected_response_start"].append(t.rejected_response_start)
            cols["chosen_target_end"].append(t.chosen_target_end)
            cols["prefix_len"].append(chat.common_prefix(t.chosen_ids, t.rejected_ids))
            cols["aspect_index"].append(t.aspect_index)
            cols["language"].append(code[t.language])
            cols["margin"].append(t.margin)
            cols["truncated"].append(t.truncated)
            cols["index"].append(lo + t.index)
        stats["kept"] += len(out)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.zeros(0, np.int64)
    stats["tokens"] = int(lengths.sum())
    n = stats["kept"]
    arrays = {c: np.asarray(v, dtype=COLUMNS[c]).reshape(n) for c, v in cols.items()}
    order = sorted(range(len(languages)), key=lambda j: (languages[j] is None, languages[j] or ""))
    rank = np.zeros(len(languages), dtype=np.int64)
    rank[order] = np.arange(len(languages))
    languages = [languages[j] for j in order]  # the shard's languages sorted, None last
    arrays["language"] = rank[arrays["language"]].astype(COLUMNS["language"]) if n else arrays["language"]
    meta = json.dumps(dict(stats=stats, languages=languages))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, tokens=tokens, lengths=lengths, meta=np.array(meta), **arrays)

    from themis_engine.fileio import atomic_write

    atomic_write(_shard_path(partial, k), write)
    return len(pairs)


def _read_shard(path: Path):
    """A written shard's arrays, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        data["meta"] = json.loads(str(data["meta"]))
        if len(data["lengths"]) != 2 * len(data["index"]) or int(data["lengths"].sum()) != len(data["tokens"]):
            raise ValueError("inconsistent arrays")
        return data
    except Exception as err:  # noqa: BLE001 -- a torn shard (a kill mid-write cannot leave one; a disk can)
        logger.warning("token store shard %s is unreadable (%s); tokenizing it again", path, err)
        return None


# ---------------------------------------------------------------------------------------- the merge
def _merge(folder: Path, partial: Path, shard_ids: list[int], key: str, extra: dict, n_source: int) -> TokenStore:
    """Concatenate the shards in order into a new store folder (temporary name, then renamed)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=folder.parent))
    try:
        languages: list = []
        lang_code: dict = {}
        cols: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
        lengths: list[np.ndarray] = []
        stats = dict(pairs=0, kept=0, truncated=0, skipped_overflow=0, skipped_identical=0, tokens=0)
        with open(tmp / TOKENS, "wb") as f:
            for k in shard_ids:
                shard = _read_shard(_shard_path(partial, k))
                if shard is None:
                    raise DataError(f"{_shard_path(partial, k)}: a shard went missing while the store was merged")
                shard["tokens"].astype(np.int32, copy=False).tofile(f)
                lengths.append(shard["lengths"])
                for name in stats:
                    stats[name] += shard["meta"]["stats"][name]
                remap = []
                for lang in shard["meta"]["languages"]:
                    if lang not in lang_code:
                        lang_code[lang] = len(languages)
                        languages.append(lang)
                    remap.append(lang_code[lang])
                for c in COLUMNS:
                    v = shard[c]
                    cols[c].append(np.asarray(remap, dtype=np.int32)[v] if c == "language" and len(v) else v)
        offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
        if lengths:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        np.save(tmp / "offsets.npy", offsets)
        n = (len(offsets) - 1) // 2
        for c, parts in cols.items():
            np.save(tmp / f"{c}.npy", np.concatenate(parts).astype(COLUMNS[c]) if parts else np.zeros(0, COLUMNS[c]))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest = dict(format=FORMAT, key=key, pairs=n, tokens=int(offsets[-1]), source_pairs=n_source,
                        languages=languages, stats=stats, files=files, extra=extra,
                        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700
        if folder.exists():  # an older or damaged store under the same name: out of the way first
            old = folder.with_name(f".{folder.name}.old{os.getpid()}")
            os.replace(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore(folder)
