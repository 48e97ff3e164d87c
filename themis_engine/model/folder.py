"""What a model folder must hold before anything is scored or served with it, checked up front.

    tokenizer = check_model_folder(path)            # CheckpointError naming the file and what is wrong

A Hugging Face reward-model folder holds config.json, *.safetensors (or shards with an index) and
the tokenizer files. Each of them, wrong, used to fail late or not at all: transformers'
AutoTokenizer builds a one-token tokenizer from a folder without tokenizer files (every text
encodes to [0], every query gets the same reward), a missing chat template closed turns with EOS
or failed deep inside the scorer, and a damaged file gave a raw parser traceback. Here each is a
CheckpointError naming the file (and the line, the key or the tensor) and what was expected:

* config.json: not JSON (line, column), not a mapping, no usable vocab_size;
* the weights: no *.safetensors, a shard index naming files that are not there, a safetensors file
  that is cut short, empty or not safetensors at all (its header is read, not the tensors);
* the tokenizer: no tokenizer files, files transformers cannot load, a tokenizer that does not
  split a probe text into several tokens (no vocabulary), a token id >= the model's vocab_size
  (a tokenizer of another model), no chat template (unless one is given, or not required);
* the shape (check_model_args): sizes that must be positive, heads that must divide.

`content_fingerprint(path)` hashes what the folder's scores depend on (every safetensors header
plus a checksum of its bytes, and every other file's content) for the evaluator's resume key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from themis_engine.errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files any of which holds a vocabulary transformers can build a tokenizer from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "tiktoken.model")
# A text every real tokenizer splits into several different tokens.
PROBE_TEXT = "def add(a, b):\n    return a + b  # Sum two numbers."
# A conversation every chat template must render.
PROBE_CONVERSATION = [{"role": "user", "content": "Write a function."},
                      {"role": "assistant", "content": "def f(): pass"}]


# ------------------------------------------------------------------------------------------ JSON files
def read_json(file: str | os.PathLike, what: str = "JSON") -> Any:
    """A JSON file's value; CheckpointError names the file, the line and column, or the byte that
    is not UTF-8."""
    file = Path(file)
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise CheckpointError(f"{file}, line {line} (byte {err.start}): not UTF-8 text; expected {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{file}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); expected {what}"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{file}: nested too deeply; expected {what}") from None


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a model folder as a mapping (CheckpointError: no folder, no file, not JSON)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model folder with config.json)")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    cfg = read_json(cfg_file, "a Hugging Face model config (a JSON object)")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object (the model config), got {type(cfg).__name__}")
    return cfg


def config_int(cfg: dict, key: str, where: str | os.PathLike, required: bool = True, default: int | None = None):
    """cfg[key] as a whole number; CheckpointError names the file and the key."""
    value = cfg.get(key)
    if value is None:
        if required:
            raise CheckpointError(f"{where}: no {key!r} (expected a whole number)")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise CheckpointError(f"{where}: {key!r} is {value!r}; expected a whole number")
    return int(value)


# ------------------------------------------------------------------------------------------ weights
def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files (from the shard index when there is one)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, 'a shard index {"weight_map": {tensor: file}}')
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: no 'weight_map' of tensor name -> file name")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: the shard index names files that are not there: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle-based weights ({', '.join(pickles)}); themis_engine reads safetensors only, "
            "because unpickling can run arbitrary code. Convert once with transformers: "
            "AutoModelForSequenceClassification.from_pretrained(path).save_pretrained(out, safe_serialization=True) "
            "(or AutoModelForCausalLM for a base model)."
        )
    raise CheckpointError(f"{path}: no *.safetensors files")


def safetensors_header(file: str | os.PathLike) -> tuple[dict, bytes]:
    """(the header mapping, its raw bytes) of a safetensors file, after checking that the file is
    as long as the header says: CheckpointError names the file and what is wrong (empty, cut short,
    not safetensors). Reads the header only."""
    file = Path(file)
    size = file.stat().st_size
    again = "; the file is damaged or was not copied whole: download or save it again"
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors file{again}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file}: not a safetensors file (its first 8 bytes announce a {n}-byte header "
                                  f"in a {size}-byte file){again}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{file}: not a safetensors file (its header is not JSON){again}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (its header is not a JSON object){again}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{file}: tensor {name!r} has no data_offsets in the header{again}")
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise CheckpointError(f"{file}: {size} bytes, but its header describes {8 + n + end}"
                              f" (tensor data {'cut short' if 8 + n + end > size else 'followed by extra bytes'})"
                              f"{again}")
    return header, raw


# ------------------------------------------------------------------------------------------ shape
def model_args_problems(args) -> list[str]:
    """What is wrong with a ModelArgs shape: each problem names the field and its value."""
    problems = []
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim"):
        value = getattr(args, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{key}={value!r} (expected a whole number >= 1)")
    heads, kv = args.num_heads, args.num_kv_heads
    if isinstance(heads, int) and isinstance(kv, int) and heads >= 1 and kv >= 1 and heads % kv:
        problems.append(f"num_heads={heads} is not a multiple of num_kv_heads={kv} (each key/value head serves "
                        "a whole group of query heads)")
    if isinstance(args.head_dim, int) and args.head_dim >= 1 and args.head_dim % 2:
        problems.append(f"head_dim={args.head_dim} (rotary embeddings need an even head_dim)")
    for key in ("rms_norm_eps", "rope_theta"):
        value = getattr(args, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            problems.append(f"{key}={value!r} (expected a finite number > 0)")
    if not args.criteria:
        problems.append("criteria=() (expected at least one reward head)")
    return problems


def check_model_args(args, where: str, error: type[Exception] = CheckpointError) -> None:
    """Raise `error` naming `where` and every problem of the shape (model_args_problems)."""
    problems = model_args_problems(args)
    if problems:
        raise error(f"{where}: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ tokenizer
def _template_text(chat_template: str | os.PathLike) -> str:
    """A chat template given as a file (.jinja, or a tokenizer_config.json holding one) or as text."""
    text = os.fspath(chat_template)
    if "{" not in text and Path(text).is_file():
        path = Path(text)
        if path.suffix == ".json":
            data = read_json(path, "a tokenizer_config.json with a chat_template")
            template = data.get("chat_template") if isinstance(data, dict) else None
            if not isinstance(template, str):
                raise CheckpointError(f"{path}: no 'chat_template' text in it")
            return template
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CheckpointError(
                f"{path}: not UTF-8 text at byte {err.start}; expected a Jinja chat template") from None
    if "{" not in text:
        raise CheckpointError(f"chat template {text!r}: no such file, and not template text (no Jinja tags)")
    return text


def load_tokenizer(path: str | os.PathLike):
    """transformers' tokenizer of a folder that holds tokenizer files (CheckpointError otherwise)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a folder with the tokenizer files)")
    found = [name for name in TOKENIZER_FILES if (path / name).is_file()] + sorted(
        p.name for p in path.glob("*.tiktoken"))
    if not found:
        raise CheckpointError(
            f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy them in from the base model "
            "(AutoTokenizer.from_pretrained(base).save_pretrained(path)) or give a tokenizer"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 -- tokenizers, sentencepiece and transformers raise many kinds
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise CheckpointError(f"{path}: the tokenizer files ({', '.join(found)}) cannot be loaded: "
                              f"{type(err).__name__}: {message}") from None


def check_tokenizer(tokenizer, where: str, vocab_size: int | None = None, require_chat_template: bool = True) -> None:
    """CheckpointError naming `where` unless the tokenizer has a vocabulary (a probe text is split
    into several tokens), every token id fits the model's embedding (< vocab_size) and, where
    required, a chat template that renders a user/assistant conversation."""
    try:
        ids = list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{where}: the tokenizer cannot encode text ({type(err).__name__}: {err})") from None
    if len(set(ids)) < 2:
        raise CheckpointError(
            f"{where}: the tokenizer has no usable vocabulary (it encodes {PROBE_TEXT!r} as {ids}); the tokenizer "
            "files are missing or damaged"
        )
    if vocab_size is not None:
        vocab = tokenizer.get_vocab()
        top_token, top_id = max(vocab.items(), key=lambda kv: kv[1]) if vocab else ("", -1)
        top_id = max(top_id, len(tokenizer) - 1)
        if top_id >= vocab_size:
            raise CheckpointError(
                f"{where}: the tokenizer has token id {top_id} ({top_token!r}) but the model's embedding has "
                f"vocab_size={vocab_size} rows (ids 0..{vocab_size - 1}); the tokenizer is not this model's"
            )
    if not require_chat_template:
        return
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError(
            f"{where}: the tokenizer has no chat template (no chat_template.jinja, none in tokenizer_config.json); "
            "copy the base model's in, or give one (chat_template=FILE or text; --chat-template on the command line)"
        )
    try:
        text = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)
    except Exception as err:  # noqa: BLE001 -- jinja2 errors, template exceptions
        raise CheckpointError(f"{where}: the chat template cannot render a user/assistant conversation "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    if not isinstance(text, str) or PROBE_CONVERSATION[-1]["content"] not in text:
        raise CheckpointError(f"{where}: the chat template does not write the assistant's answer into its "
                              f"rendering of a user/assistant conversation (got {str(text)[:120]!r})")


def check_model_folder(path: str | os.PathLike, tokenizer=None, *, chat_template: str | os.PathLike | None = None,
                       require_chat_template: bool = True):
    """Check a reward-model folder before its weights are loaded; returns the tokenizer to use.

    path: the model folder (config.json, *.safetensors, tokenizer files). tokenizer: None (the
    folder's tokenizer files), a folder holding them, or a loaded tokenizer (checked the same way).
    chat_template: a Jinja template (a file, or the text) set on the tokenizer, for a folder without
    one or to replace it. require_chat_template=False: a tokenizer without a template passes (for
    pre-tokenized scoring only). Raises CheckpointError naming the file and what is wrong."""
    path = Path(path)
    cfg = read_config(path)
    vocab_size = config_int(cfg, "vocab_size", path / "config.json")
    if vocab_size < 1:
        raise CheckpointError(f"{path / 'config.json'}: 'vocab_size' is {vocab_size}; expected a whole number >= 1")
    for file in safetensors_files(path):
        safetensors_header(file)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        source = path if tokenizer is None else Path(tokenizer)
        tokenizer = load_tokenizer(source)
        where = str(source)
    else:
        where = f"the tokenizer given for {path}"
    if chat_template is not None:
        tokenizer.chat_template = _template_text(chat_template)
        where += " (with the chat template given)"
    check_tokenizer(tokenizer, where, vocab_size, require_chat_template)
    return tokenizer


# ------------------------------------------------------------------------------------------ fingerprint
_CHUNK = 1 << 24
# The files of a model folder that scores depend on: weights, config.json and the other JSON files
# (shard index, tokenizer config), tokenizer vocabularies (.model, vocab.txt / merges.txt, .tiktoken)
# and chat templates (.jinja).
SCORED_SUFFIXES = (".safetensors", ".json", ".jinja", ".model", ".txt", ".tiktoken")


def file_checksum(file: str | os.PathLike, start: int = 0) -> str:
    """CRC-32 (8 hex digits) of a file's bytes from `start`, read in 16 MiB pieces: about 1 GB/s on
    one core (blake2b is 5 times slower), and zlib lets other threads run meanwhile."""
    crc = 0
    with open(file, "rb") as f:
        f.seek(start)
        while piece := f.read(_CHUNK):
            crc = zlib.crc32(piece, crc)
    return f"{crc:08x}"


def content_fingerprint(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{file name: what its content is} over the model folder's files that scoring reads
    (SCORED_SUFFIXES: weights, configs, tokenizer files, chat templates; not a README, not
    sub-folders): a safetensors file by the hash of its header (blake2b) and a checksum of its tensor
    bytes (CRC-32), every other file by a checksum of its bytes. Two folders with equal fingerprints
    score alike; weights replaced by others of the same size differ (the sizes alone did not tell).
    Reads every byte: about a second per GB on one core."""
    out: dict[str, dict[str, Any]] = {}
    for file in sorted(Path(path).iterdir()):
        if not file.is_file() or file.name.startswith(".") or file.suffix not in SCORED_SUFFIXES:
            continue
        if file.suffix == ".safetensors":
            _, raw = safetensors_header(file)
            out[file.name] = {"header": hashlib.blake2b(raw, digest_size=16).hexdigest(),
                              "data_crc32": file_checksum(file, 8 + len(raw)), "bytes": file.stat().st_size}
        else:
            out[file.name] = {"crc32": file_checksum(file), "bytes": file.stat().st_size}
    return out


def text_checksum(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


__all__ = [
    "PROBE_CONVERSATION", "TOKENIZER_FILES", "check_model_args", "check_model_folder", "check_tokenizer",
    "config_int", "content_fingerprint", "file_checksum", "load_tokenizer", "model_args_problems", "read_config",
    "read_json", "safetensors_files", "safetensors_header", "text_checksum",
]
