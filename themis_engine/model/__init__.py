"""The model: one generic decoder on the packed stream, and its Hugging Face checkpoints.

    args.py           ModelArgs, the per-family table (Qwen3 / Qwen2 / Llama), named Qwen3 shapes
    decoder.py        RewardModel: embeddings -> blocks -> final norm -> one reward head per criterion
    hf_checkpoint.py  safetensors in (streamed per tensor), *ForSequenceClassification out
    fp8.py            FP8 block weights (e4m3, per-channel scales)
    offload.py        blocks in pinned host memory, streamed to the GPU one at a time
    flops.py          FLOPs per token and the peak of known cards (MFU on unique tokens)
"""

from themis_engine.model.args import DEFAULT_CRITERIA, NAMED_SHAPES, ModelArgs
from themis_engine.model.decoder import RewardModel
from themis_engine.model.hf_checkpoint import load_reward_model, save_reward_model


# Loading and saving live in hf_checkpoint.py (which builds a RewardModel, so decoder.py cannot import
# it back); they are bound here, where both modules are loaded, so that users find them on the class.
def _from_pretrained(cls, path, **kwargs) -> RewardModel:
    """Load a Hugging Face folder (config.json + *.safetensors); see hf_checkpoint.load_reward_model."""
    return load_reward_model(path, **kwargs)


def _save_pretrained(self, out_dir, **kwargs) -> None:
    """Write a *ForSequenceClassification folder transformers loads; see hf_checkpoint.save_reward_model."""
    save_reward_model(self, out_dir, **kwargs)


RewardModel.from_pretrained = classmethod(_from_pretrained)
RewardModel.save_pretrained = _save_pretrained

__all__ = ["DEFAULT_CRITERIA", "NAMED_SHAPES", "ModelArgs", "RewardModel", "load_reward_model", "save_reward_model"]
