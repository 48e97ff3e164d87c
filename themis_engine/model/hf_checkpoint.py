"""Reading and writing Hugging Face checkpoints (config.json + safetensors), straight into the
engine's modules: no transformers model is built, tensors go file -> target dtype -> device one at
a time (host memory bounded by the largest tensor), and nothing pickle-based is ever read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from themis_engine.errors import CheckpointError, ConfigError
from themis_engine.fileio import atomic_write, write_json
from themis_engine.model.args import (
    DEFAULT_CRITERIA,
    FAMILIES,
    HEAD_KINDS,
    SUPPORTED_ARCHITECTURES,
    ModelArgs,
    rope_inv_freq,
)
from themis_engine.model.decoder import RewardModel
from themis_engine.model.folder import (  # noqa: F401 -- read_config, safetensors_files: this module's API
    PICKLE_SUFFIXES,
    check_model_args,
    read_config,
    safetensors_files,
)

# Tensors some checkpoints carry that the engine recomputes or does not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Non-finite values are counted in pieces of this many elements (bounded temporary memory).
_FINITE_CHUNK = 1 << 24


def architecture_of(cfg: dict, tensor_names: Iterable[str]) -> tuple[str, str]:
    """(family, head kind) of a checkpoint; head kind is "ForSequenceClassification" or "ForCausalLM"."""
    archs = cfg.get("architectures") or []
    for arch in archs:
        for fam in FAMILIES.values():
            for kind in HEAD_KINDS:
                if arch == fam.hf_prefix + kind:
                    return fam.name, kind
    if archs:
        raise CheckpointError(
            f"unsupported architecture {archs[0]!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    kind = "ForSequenceClassification" if "score.weight" in set(tensor_names) else "ForCausalLM"
    return model_type, kind


def _damaged(file: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{file}: not a readable safetensors file ({err}); the file is damaged or was not "
                           "copied whole: download or save it again")


def _tensor_index(files: Sequence[Path]) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    index[name] = file
        except SafetensorError as err:
            raise _damaged(file, err) from None
    return index


def model_args_of(cfg: dict, path) -> ModelArgs:
    """ModelArgs from a config.json mapping, checked (check_model_args); CheckpointError names the
    file and the key that is missing or wrong."""
    where = Path(path) / "config.json"
    try:
        args = ModelArgs.from_hf_config(cfg)
    except KeyError as err:
        raise CheckpointError(f"{where}: no {err.args[0]!r} (a {cfg.get('model_type')} config needs it)") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None
    check_model_args(args, str(where))
    return args


def count_nonfinite(tensor: torch.Tensor) -> int:
    """How many NaN / inf values a floating-point tensor holds (0 for other dtypes); counted in
    pieces, so the temporary memory stays small beside a large embedding."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    flat = tensor.reshape(-1)
    try:
        ok = torch.stack([torch.isfinite(piece).all() for piece in flat.split(_FINITE_CHUNK)]).all()
        if bool(ok):
            return 0
        return int(sum(int((~torch.isfinite(piece)).sum()) for piece in flat.split(_FINITE_CHUNK)))
    except (RuntimeError, NotImplementedError):  # a dtype isfinite does not cover (FP8 storage)
        return 0


def load_reward_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    criteria: int | Sequence[str] | None = None,
    keep_lm_head: bool = True,
    quantize: str | None = None,
) -> RewardModel:
    """Load a *ForSequenceClassification or *ForCausalLM checkpoint of a supported family.

    dtype: the compute dtype (default: the checkpoint's `torch_dtype`/`dtype`, else float32).
    device: where the weights go (default cpu). criteria: for a *ForCausalLM checkpoint, the reward
    heads to create (a count or names; default one head, "reward"), zero-initialised; for a
    *ForSequenceClassification checkpoint, optional names that replace id2label's (count must match).
    keep_lm_head: for a *ForCausalLM checkpoint, also load the LM head (the trainer's LM loss).
    quantize: "fp8" stores the blocks' linear weights in e4m3 with per-channel scales (fp8.py).
    """
    cfg = read_config(path)
    files = safetensors_files(path)
    where = _tensor_index(files)
    family, kind = architecture_of(cfg, where)
    cfg.setdefault("model_type", family)
    args = model_args_of(cfg, path)
    is_cls = kind == "ForSequenceClassification"
    if is_cls and not cfg.get("id2label") and "num_labels" not in cfg and "score.weight" in where:
        # transformers omits a default id2label (LABEL_0..) from config.json: count the head's rows
        with safe_open(str(where["score.weight"]), framework="pt") as f:
            rows = f.get_slice("score.weight").get_shape()[0]
        args.criteria = tuple(f"LABEL_{i}" for i in range(rows))
    if is_cls:
        if criteria is not None:
            names = _criteria_names(criteria)
            if len(names) != args.num_criteria:
                raise CheckpointError(
                    f"{path}: {len(names)} criteria names given for a checkpoint with {args.num_criteria} heads"
                )
            args.criteria = names
    else:
        args.criteria = _criteria_names(criteria if criteria is not None else 1)
    dtype = _resolve_dtype(dtype, cfg, path)
    device = torch.device(device or "cpu")
    with_lm_head = (not is_cls) and keep_lm_head

    with torch.device("meta"):
        model = RewardModel(args, with_lm_head=with_lm_head)
    expected = {name: p for name, p in model.named_parameters(remove_duplicate=True)}
    if not is_cls:
        expected.pop("score.weight")  # created below, zero-initialised
    if with_lm_head and args.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # shared with the embeddings

    missing = [n for n in expected if n not in where]
    mis_shaped = []
    for name, param in expected.items():
        if name in where:
            with safe_open(str(where[name]), framework="pt") as f:
                shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(param.shape):
                mis_shaped.append(f"{name}: {shape} in the file, {tuple(param.shape)} expected")
    if missing or mis_shaped:
        lines = [f"{path}: the checkpoint does not match a {FAMILIES[family].hf_prefix}{kind} of its config:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if mis_shaped:
            lines.append(f"  mis-shaped tensors ({len(mis_shaped)}): " + "; ".join(mis_shaped))
        raise CheckpointError("\n".join(lines))

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(where[name], []).append(name)
    # quantize="fp8": each block is quantized as soon as its last tensor is in, so the compute-dtype
    # copies of the linear weights never exceed a block or two (32B in FP8 on a GPU too small for bf16)
    quant_block, fp8_report = None, None
    if quantize is not None:
        from themis_engine.model.fp8 import QuantReport, quantize_block, resolve_fp8_dtype

        fp8_dtype, fp8_report = resolve_fp8_dtype(quantize), QuantReport()
        pending = [0] * args.num_layers
        for name in expected:
            if name.startswith("model.layers."):
                pending[int(name.split(".")[2])] += 1

        def quant_block(name: str) -> None:
            if name.startswith("model.layers."):
                i = int(name.split(".")[2])
                pending[i] -= 1
                if pending[i] == 0:
                    quantize_block(model.model.layers[i], i, fp8_dtype, False, fp8_report)
    # safetensors can put tensors straight on a CUDA device; the cast then happens there
    open_device = str(device) if device.type == "cuda" else "cpu"
    nonfinite: list[tuple[str, int, int]] = []  # (tensor, non-finite values, values)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=open_device) as f:
                for name in names:
                    tensor = f.get_tensor(name).to(device=device, dtype=dtype)
                    bad = count_nonfinite(tensor)
                    if bad:
                        nonfinite.append((name, bad, tensor.numel()))
                    _assign(model, name, tensor)
                    del tensor
                    if quant_block is not None:
                        quant_block(name)
        except SafetensorError as err:
            raise _damaged(file, err) from None
    if nonfinite:
        shown = ", ".join(f"{name} ({bad} of {n})" for name, bad, n in nonfinite[:8])
        more = f" and {len(nonfinite) - 8} more" if len(nonfinite) > 8 else ""
        raise CheckpointError(
            f"{path}: {len(nonfinite)} weight tensor(s) hold NaN or inf values (in {str(dtype).replace('torch.', '')})"
            f": {shown}{more}; scores computed through them would be NaN. The checkpoint is damaged (a diverged "
            "training run, a bad conversion, or values too large for this dtype)"
        )
    if not is_cls:
        _assign(model, "score.weight", torch.zeros(args.num_criteria, args.hidden_size, dtype=dtype, device=device))
    if with_lm_head and args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(args)[0].to(device)  # buffers were made on meta: recompute
    unexpected = [
        n for n in where
        if n not in expected and n != "score.weight" and n != "lm_head.weight" and not n.endswith(_IGNORED_SUFFIXES)
    ]
    if unexpected:
        import warnings

        warnings.warn(f"{path}: {len(unexpected)} tensors not used by the engine: {', '.join(unexpected[:10])}")
    if fp8_report is not None:
        logging.getLogger("themis_engine").info("%s", fp8_report)
    return model.eval()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))


def _criteria_names(criteria: int | Sequence[str]) -> tuple[str, ...]:
    if isinstance(criteria, int):
        if criteria < 1:
            raise ValueError(f"criteria: need at least one head, got {criteria}")
        if criteria == 1:
            return ("reward",)
        if criteria == len(DEFAULT_CRITERIA):
            return DEFAULT_CRITERIA
        return tuple(f"criterion_{i}" for i in range(criteria))
    names = tuple(str(c) for c in criteria)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"criteria: names must be non-empty and distinct, got {list(names)}")
    return names


FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def _resolve_dtype(dtype, cfg, path=None) -> torch.dtype:
    """The compute dtype: the one given (ConfigError when it is not a floating-point torch dtype), else
    config.json's `dtype` / `torch_dtype` (CheckpointError naming the file and key), else float32."""
    given = dtype is not None
    if dtype is None:
        key = "dtype" if cfg.get("dtype") else "torch_dtype"
        dtype = cfg.get(key) or "float32"
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        value = getattr(torch, name, None) if name.isidentifier() else None
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            if given:
                raise ConfigError(f"dtype {dtype!r}: not a floating-point torch dtype (use {', '.join(FLOAT_DTYPES)})")
            where = Path(path) / "config.json" if path is not None else "config.json"
            raise CheckpointError(f"{where}: {key!r} is {dtype!r}, not a floating-point torch dtype "
                                  f"(expected one of {', '.join(FLOAT_DTYPES)})")
        dtype = value
    elif not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype {dtype!r}: not a floating-point torch dtype (use {', '.join(FLOAT_DTYPES)})")
    return dtype


def save_reward_model(
    model: RewardModel,
    out_dir: str | os.PathLike,
    max_shard_bytes: int = 5 * 1024**3,
    pad_token_id: int | None = None,
    extra_config: dict | None = None,
) -> None:
    """Write a *ForSequenceClassification checkpoint that transformers loads.

    Files: config.json (architectures, num_labels, id2label/label2id = the criteria, problem_type
    "regression", pad_token_id) and model.safetensors, or model-0000i-of-0000n.safetensors shards
    with model.safetensors.index.json when over max_shard_bytes. Every file is written under a
    temporary name and renamed into place, so an interrupted save leaves no half-written file.
    The LM head is not written (a sequence classifier has none).
    pad_token_id: written to the config (default: the model's, else the config's eos_token_id);
    transformers needs one to find the last token of padded batches.
    extra_config: more config.json fields (the trainer's criteria and reward statistics).
    """
    quantized = [n for n, b in model.named_buffers() if n.endswith("weight_fp8")]
    if quantized:
        raise ValueError(
            f"save_pretrained: the model holds FP8-quantized weights ({len(quantized)} tensors, e.g. "
            f"{quantized[0]}); the export format stores full-precision weights: save the model before "
            "quantizing it (quantize at load time with quantize='fp8')"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = model.args
    cfg = args.to_hf_config("ForSequenceClassification")
    pad = pad_token_id if pad_token_id is not None else args.pad_token_id
    if pad is None:
        eos = cfg.get("eos_token_id")
        pad = eos[0] if isinstance(eos, list) and eos else eos
    if pad is not None:
        cfg["pad_token_id"] = int(pad)
    cfg["dtype"] = str(model.dtype).replace("torch.", "")
    cfg.update(extra_config or {})
    cfg.pop("torch_dtype", None)

    tensors = {
        name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters(remove_duplicate=False)
        if not name.startswith("lm_head.")
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(out / "model.safetensors", lambda tmp: _save_safetensors(shards[0], tmp, meta))
        stale_index = out / "model.safetensors.index.json"
        if stale_index.exists():
            stale_index.unlink()
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            atomic_write(out / fname, lambda tmp, s=shard: _save_safetensors(s, tmp, meta))
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(out / "model.safetensors.index.json", lambda tmp: write_json(index, tmp))
    atomic_write(out / "config.json", lambda tmp: write_json(cfg, tmp))


def _save_safetensors(tensors: dict[str, torch.Tensor], tmp: str, meta: dict) -> None:
    """save_file into atomic_write's temporary file, keeping the permissions atomic_write gave it (the
    umask's): safetensors' writer replaces the file with a new one of mode 0600."""
    mode = os.stat(tmp).st_mode & 0o777
    save_file(tensors, tmp, metadata=meta)
    os.chmod(tmp, mode)
