"""Training features applied to an unchanged model, in one function and a fixed order (as torchtitan's
`parallelize`): activation checkpointing per block, then torch.compile per block, then FSDP2
`fully_shard` per block and on the root.

    objective = parallelize(objective, activation_checkpointing=True, compile=False, shard=True,
                            param_dtype=torch.bfloat16)

The model itself has no checkpointing flag: a block is recomputed in the backward because it is
wrapped (`checkpoint_wrapper`), and compiled because it is replaced by its `torch.compile` module.
Both wrappers add a prefix to the module path of the block's parameters
(`model.layers.0._checkpoint_wrapped_module._orig_mod.mlp...`); `state_dict()` of a checkpoint
wrapper strips its prefix itself, and torch.distributed.checkpoint's `get_state_dict` /
`get_model_state_dict` (which the checkpoints and the export use) strip both, so saved and exported
names are the plain HF ones. `plain_name` strips them where code reads `named_parameters()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

# torch 2.11 - 2.13: the wrapper lives in a private module (the one FSDP and torchtitan use); its
# state-dict hooks and DCP's name resolution know its prefix
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from themis_engine.model.decoder import RewardModel

# models over this many parameters recompute their blocks in the backward unless told otherwise
AC_DEFAULT_MIN_PARAMS = 1e9
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def wants_activation_checkpointing(rm: RewardModel, setting: bool | None) -> bool:
    """model.activation_checkpointing when set, else on for models over 1B parameters."""
    if setting is not None:
        return bool(setting)
    return sum(p.numel() for p in rm.parameters()) > AC_DEFAULT_MIN_PARAMS


def plain_name(name: str) -> str:
    """A parameter's name without the checkpoint / compile wrappers' prefixes (the HF name)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _recompute_in_backward(block: nn.Module, *args):
    """Non-reentrant checkpoint of one block while autograd records; a plain call under no_grad
    (evaluation), where there is nothing to save."""
    if not torch.is_grad_enabled():
        return block(*args)
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def apply_activation_checkpointing(rm: RewardModel) -> None:
    """Wrap every block of `rm` (in place) so that its activations are recomputed in the backward."""
    layers = rm.model.layers
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, checkpoint_fn=_recompute_in_backward)


def apply_compile(rm: RewardModel, backend: str = "inductor") -> None:
    """Replace every block of `rm` (in place) by its torch.compile module (blocks share one graph)."""
    layers = rm.model.layers
    for i, block in enumerate(layers):
        layers[i] = torch.compile(block, backend=backend)


def apply_fsdp(objective: nn.Module, rm: RewardModel, param_dtype: torch.dtype) -> None:
    """FSDP2 `fully_shard` on every block, then on the root (embeddings, final norm, heads), with
    float32 master weights, `param_dtype` compute and float32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: the blocks' float inputs include the rotary inv_freq (and the
    # root's, the BT margins), which must stay float32; the residual stream is already bf16
    # because the embedding's weight is
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in rm.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(objective, mp_policy=mp)


def parallelize(
    objective: nn.Module,
    *,
    activation_checkpointing: bool | None = None,
    compile: bool = False,
    shard: bool = False,
    param_dtype: torch.dtype = torch.float32,
    compile_backend: str = "inductor",
) -> nn.Module:
    """Apply, in this order: activation checkpointing per block (`activation_checkpointing`: True,
    False, or None = on for models over 1B parameters), torch.compile per block (`compile`), FSDP2
    per block and on the root (`shard`; under torchrun, or for bf16 compute on one GPU).

    `objective` is a RewardObjective (or any module with the reward model at `.rm`), already on
    its device; it is changed in place and returned. Parameter values and (DCP) state-dict names
    are unchanged."""
    rm: RewardModel = objective.rm
    if wants_activation_checkpointing(rm, activation_checkpointing):
        apply_activation_checkpointing(rm)
    if compile:
        apply_compile(rm, compile_backend)
    if shard:
        apply_fsdp(objective, rm, param_dtype)
    return objective
