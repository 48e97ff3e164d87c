"""Tiny random checkpoints and a small chat tokenizer, made locally with transformers (no download),
for the tests, the demos and the CPU benchmarks.

    tiny.py   build_tokenizer (byte-level BPE + ChatML template), hf_config, build_checkpoint
"""

from themis_engine.testing.tiny import CHATML_TEMPLATE, SPECIAL_TOKENS, build_checkpoint, build_tokenizer, hf_config

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "build_checkpoint", "build_tokenizer", "hf_config"]
