"""Chat-template rendering and the over-length cut, shared by the scorer and the trainer's data.

A conversation is rendered to text with the tokenizer's chat template and encoded without special
tokens (the template holds any BOS). Over max_length, the answer (the last message's content) is cut
from the right and the template's closing tokens (the text after the answer) are kept.
"""

from __future__ import annotations

from typing import Sequence

_SENTINEL = "\x00THEMIS\x01ANSWER\x00"


def render(tokenizer, conv: list[dict]) -> str:
    return tokenizer.apply_chat_template(conv, tokenize=False)


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def answer_span(tokenizer, conv: list[dict], text: str) -> int:
    """Character offset in `text` (the rendering of conv) of the last message's content, -1 if not
    found. The conversation is rendered again with a sentinel in place of that content; where the
    template copies content verbatim this gives the offset exactly (a plain search for the content
    can land inside the closing tokens, e.g. an answer "e" in "<|im_end|>"). Otherwise the last
    occurrence of the content is taken."""
    content = conv[-1]["content"]
    probe = conv[:-1] + [dict(conv[-1], content=_SENTINEL)]
    marked = render(tokenizer, probe)
    at = marked.find(_SENTINEL)
    if at >= 0 and marked[:at] + content + marked[at + len(_SENTINEL):] == text:
        return at
    return text.rfind(content) if content else -1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def fit_to_length(ids: list[int], start: int, tail: list[int], max_length: int, what: str,
                  error=ValueError) -> list[int]:
    """Cut `ids` to max_length keeping its first tokens and the closing tokens `tail` (dropped when
    they do not tokenize apart at the end of ids). start: where the answer begins; a prompt that
    alone does not fit raises `error` naming `what`."""
    if tail and ids[-len(tail):] != tail:
        tail = []
    keep = max_length - len(tail)
    if start + 1 > keep:
        raise error(
            f"{what}: the prompt alone is {start} tokens (+{len(tail)} closing), over max_length={max_length}; "
            "raise max_length or use on_overflow='skip'"
        )
    return ids[:keep] + tail


def truncate(tokenizer, conv: list[dict], text: str, ids: list[int], max_length: int, what: str,
             error=ValueError) -> list[int]:
    """The over-length cut of one rendered conversation (render -> ids already done)."""
    at = answer_span(tokenizer, conv, text)
    if at < 0:
        return fit_to_length(ids, 0, [], max_length, what, error)
    head, tail = encode_many(tokenizer, [text[:at], text[at + len(conv[-1]["content"]):]])
    return fit_to_length(ids, common_prefix(head, ids), tail, max_length, what, error)
