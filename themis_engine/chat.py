"""The one chat path: conversation -> the token ids a reward model scores (and trains on).

Every entry point (the Scorer, the trainer's data, the TRL and verl adapters, the server) turns a
conversation into ids here, so they cannot drift apart:

    encoded = chat.encode(tokenizer, conversations, max_length=4096)   # list[Encoded | None]

A conversation is rendered with the tokenizer's own chat template (`apply_chat_template(...,
tokenize=False)`) and the text encoded without special tokens (the template holds any BOS). The
scored turn is the LAST message (an assistant turn). Where its content lies in the ids is found in
token space, without assuming the template copies the content verbatim (real templates rewrite it:
Qwen3 strips leading newlines and turns text before `</think>` into a think block): the same
conversation is rendered again with two probe answers ("a", "b") in place of the last content, and

* `answer_start` = the first token where the real rendering differs from a probe's (the longest
  common token prefix), i.e. the first token whose text depends on the answer;
* `closing_start` = the first token of the longest common token suffix after that: the template's
  closing tokens (ChatML: `<|im_end|>` `\\n`), the same for every answer.

So `ids[answer_start:closing_start]` are exactly the tokens the template emits for the answer. For
an answer the template rewrites, these are the rewritten tokens (e.g. Qwen3's `\\nplan\\n</think>\\n\\ncode`
for the content `<think>plan</think>code`), and text the template emits for every answer is not
part of it (Qwen3's `<think>` opening, or the empty `<think>\\n\\n</think>\\n\\n` it adds to a plain
answer). Where a token of the template's text merges with the answer's first or last characters
(Qwen3's `\\n` after `<think>`, which is one `\\n\\n` token in the empty think block), that token
counts as the answer's. An empty answer (or a blank one the template renders as the empty one)
has an empty span. A template that writes nothing after the answer (GLM-4 MoE) has no closing
tokens, and then no end-of-turn target.

The over-length cut (`on_overflow="truncate"`): the last turn's answer is cut from the right in
token space and the closing tokens are kept, `ids[:max_length - n_closing] + ids[closing_start:]`
(at least one answer token stays); the prompt is never cut: a prompt that alone does not fit
(`answer_start + 1 + n_closing > max_length`) is an error naming the item. An answer of more than
CHARS_PER_TOKEN_BOUND * max_length characters is first cut to that many characters (then
`full_length` counts the tokens of that cut text): the same ids for any template that renders the
answer's start without looking at its end (a Qwen3 answer whose `</think>` lies beyond that point
is rendered without its think block).

LM targets (`Encoded.targets`): the answer's tokens plus the end-of-turn token (the first closing
token: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...): the model must learn where its answer ends,
while what the template adds after it (a newline) and everything before the answer (system, user
turns, the role header, a think opening the template writes for every answer) are not targets. A
think block written by the answer itself is the answer's text and so is a target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

from themis_engine.errors import InputError

__all__ = [
    "Encoded", "OVERFLOW_POLICIES", "check_conversation", "common_prefix", "common_suffix", "encode",
    "encode_many", "fit", "render", "turn_closing",
]

OVERFLOW_POLICIES = ("truncate", "skip", "error")
# An answer longer than this many characters per token of max_length is cut to that before it is
# rendered and encoded: it is over max_length whatever its tokens (no real tokenizer makes tokens of
# 64 characters on average), and memory then follows max_length, not the raw text.
CHARS_PER_TOKEN_BOUND = 64
# Probe answers: plain letters no template treats specially, differing in first and last token.
_PROBES = ("a", "b")


@dataclass(frozen=True)
class Encoded:
    """One conversation as the ids scored.

    ids: the scored sequence (after any cut). answer_start / closing_start: indices into ids (see
    the module docstring); None where the spans were not asked for (`encode(spans=False)`, only
    sequences that needed the cut have them). full_length: tokens before the cut.
    """

    ids: list[int]
    answer_start: int | None
    closing_start: int | None
    full_length: int

    @property
    def truncated(self) -> bool:
        return len(self.ids) < self.full_length

    @property
    def target_end(self) -> int:
        """End (exclusive) of the LM targets: the answer and the end-of-turn token."""
        if self.closing_start is None:
            raise ValueError("this Encoded was made without spans")
        return min(self.closing_start + 1, len(self.ids))

    @property
    def targets(self) -> list[int]:
        """The LM target tokens: ids[answer_start:target_end]."""
        return self.ids[self.answer_start:self.target_end]


def render(tokenizer, conv: list[dict]) -> str:
    """The conversation as text, by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(conv, tokenize=False)


def encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """Texts -> ids in one batched tokenizer call, no special tokens added."""
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def common_suffix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the longest common suffix of a and b, at most `limit`."""
    n = min(len(a), len(b)) if limit is None else min(len(a), len(b), limit)
    i = 0
    while i < n and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def encode(
    tokenizer,
    conversations: Sequence[list[dict]],
    max_length: int | None = None,
    on_overflow: str = "truncate",
    names: Sequence[str] | None = None,
    error: type[Exception] = InputError,
    spans: bool = True,
) -> list[Encoded | None]:
    """Conversations (each a list of {"role", "content"} messages whose last one is the scored turn)
    -> one Encoded each, in order; None for a sequence over max_length under on_overflow="skip".

    max_length: None for no limit. on_overflow: "truncate" (the cut of the module docstring),
    "skip" (None) or "error" (raise `error` naming the item). names: how errors call each
    conversation (default "conversation i"). spans=False: answer_start / closing_start only for the
    sequences that needed the cut (saves the probe renderings where only the ids are needed).
    All texts of a call are encoded in one batched tokenizer call.
    """
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
    convs = list(conversations)
    whats = list(names) if names is not None else [f"conversation {i}" for i in range(len(convs))]
    if len(whats) != len(convs):
        raise ValueError(f"{len(convs)} conversations but {len(whats)} names")
    for conv, what in zip(convs, whats):
        check_conversation(conv, what, error)
    if max_length is not None:  # memory bounded by max_length, not by the raw text (a 50 MB answer)
        limit = CHARS_PER_TOKEN_BOUND * max_length
        convs = [c if len(c[-1]["content"]) <= limit else c[:-1] + [dict(c[-1], content=c[-1]["content"][:limit])]
                 for c in convs]
    texts = [_render(tokenizer, conv, what, error) for conv, what in zip(convs, whats)]
    offsets = None
    if spans and texts and getattr(tokenizer, "is_fast", False):  # one encoding gives ids and offsets
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = [list(x) for x in enc["input_ids"]], enc["offset_mapping"]
    else:
        ids = encode_many(tokenizer, texts)
    for x, what in zip(ids, whats):
        if not x:
            raise error(f"{what}: the chat template produced no tokens")
    over = [k for k, x in enumerate(ids) if max_length is not None and len(x) > max_length]
    if over and on_overflow == "error":
        k = over[0]
        raise error(f"{whats[k]}: {len(ids[k])} tokens, over max_length={max_length}")
    need = list(range(len(convs))) if spans else (over if on_overflow == "truncate" else [])
    found = _spans(tokenizer, [convs[k] for k in need], [texts[k] for k in need], [ids[k] for k in need],
                   [whats[k] for k in need], error, None if offsets is None else [offsets[k] for k in need])
    span_of = dict(zip(need, found))
    out: list[Encoded | None] = []
    for k, x in enumerate(ids):
        a, c = span_of.get(k, (None, None))
        if max_length is not None and len(x) > max_length:
            if on_overflow == "skip":
                out.append(None)
                continue
            out.append(fit(Encoded(x, a, c, len(x)), max_length, whats[k], error))
        else:
            out.append(Encoded(x, a, c, len(x)))
    return out


def fit(enc: Encoded, max_length: int, what: str, error: type[Exception] = InputError) -> Encoded:
    """The over-length cut: keep ids[:max_length - n_closing] and the closing tokens; the prompt
    (ids[:answer_start]) and one answer token must fit, else `error` naming `what`."""
    if len(enc.ids) <= max_length:
        return enc
    a, c = enc.answer_start, enc.closing_start
    closing = enc.ids[c:]
    keep = max_length - len(closing)
    need = a + min(1, c - a)
    if keep < need:
        raise error(
            f"{what}: the prompt alone is {a} tokens (+{len(closing)} closing tokens of the turn), "
            f"over max_length={max_length}; raise max_length or shorten the prompt"
        )
    return Encoded(enc.ids[:keep] + closing, a, keep, enc.full_length)


def turn_closing(tokenizer) -> list[int]:
    """The ids the chat template writes after an assistant turn's content (ChatML: `<|im_end|>\\n`):
    the common token suffix of two probe conversations."""
    probes = [[{"role": "user", "content": "u"}, {"role": "assistant", "content": p}] for p in _PROBES]
    a, b = encode_many(tokenizer, [render(tokenizer, c) for c in probes])
    n = common_suffix(a, b, min(len(a), len(b)) - common_prefix(a, b))
    return a[len(a) - n:]


def check_conversation(conv, what: str, error: type[Exception] = InputError) -> None:
    """A non-empty list of messages with string 'role' and 'content', ending with an assistant turn."""
    if not isinstance(conv, (list, tuple)) or not conv:
        raise error(f"{what}: a conversation must be a non-empty list of messages")
    for j, m in enumerate(conv):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise error(f"{what}, message {j}: each message needs a string 'role' and a string 'content'")
    if conv[-1]["role"] != "assistant":
        raise error(
            f"{what}: the last message has role {conv[-1]['role']!r}; a scored conversation must end with "
            "an assistant turn (the response to score)"
        )


def _render(tokenizer, conv, what: str, error) -> str:
    try:
        return render(tokenizer, conv)
    except Exception as err:  # jinja raises TemplateError, and templates raise their own messages
        raise error(f"{what}: the chat template could not render it ({type(err).__name__}: {err})") from None


def _spans(tokenizer, convs, texts, ids, whats, error, offsets=None) -> list[tuple[int, int]]:
    """(answer_start, closing_start) of each conversation, from its rendering with probe answers.

    The probes are rendered once per prompt (conversations that differ only in the last content share
    them) and, with a fast tokenizer, encoded only in a window: from just after the last added token
    (<|im_start|>, <think>, ...) before the place where the texts part, to just before the first added
    token after the place where they join again. Added tokens are split out before any other
    tokenization, so outside that window the two encodings are the same tokens, and the window alone
    gives the common token prefix and suffix that encoding whole renderings would: the prompt is not
    encoded again."""
    keys, probe_convs = [], {}
    for conv in convs:
        key = _prompt_key(conv)
        keys.append(key)
        if key not in probe_convs:
            probe_convs[key] = [conv[:-1] + [dict(conv[-1], content=p)] for p in _PROBES]
    probe_texts = {key: [_render(tokenizer, c, "probe", error) for c in pcs] for key, pcs in probe_convs.items()}
    if offsets is None:
        offsets = _offsets(tokenizer, texts, ids)
    added = _added_ids(tokenizer) if offsets is not None else set()
    # one window (or whole text) per (conversation, probe): all encoded in one batched call
    plans, windows = [], []
    for k, (text, x, key) in enumerate(zip(texts, ids, keys)):
        for probe in probe_texts[key]:
            if probe == text:  # the answer is the probe itself: that probe says nothing
                plans.append(None)
                continue
            if offsets is None:
                plans.append((0, len(x)))
                windows.append(probe)
                continue
            lo, hi, w, e = _window(text, probe, x, offsets[k], added)
            plans.append((lo, hi))
            windows.append(probe[w: len(probe) - (len(text) - e)])
    encoded = iter(encode_many(tokenizer, windows))
    blank = [not conv[-1]["content"].strip() and (conv[-1]["content"] == "" or _render(
        tokenizer, conv[:-1] + [dict(conv[-1], content="")], "probe", error) == text)
        for conv, text in zip(convs, texts)]
    out = []
    for j, (x, what) in enumerate(zip(ids, whats)):
        starts, ends = [], []
        for plan in plans[len(_PROBES) * j: len(_PROBES) * (j + 1)]:
            if plan is None:
                continue
            lo, hi = plan
            p, mine = next(encoded), x[lo:hi]
            pre = common_prefix(mine, p)
            suf = common_suffix(mine, p, min(len(mine), len(p)) - pre)
            starts.append(lo + pre)
            ends.append(hi - suf)
        if not starts:
            raise error(f"{what}: the chat template renders the same tokens for any answer; it does not "
                        "show the last message's content")
        start, end = min(starts), max(ends)
        if blank[j]:  # renders as the empty answer does: no answer tokens (a whitespace token the template
            start = end  # writes before the answer may merge differently before a probe's letter)
        out.append((start, end))
    return out


def _offsets(tokenizer, texts, ids):
    """Each text's token character offsets (a fast tokenizer's offset mapping), checked to be the same
    ids as `ids`; None where the tokenizer gives none."""
    if not texts or not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    if [list(x) for x in enc["input_ids"]] != ids:
        return None
    return enc["offset_mapping"]


def _added_ids(tokenizer) -> set[int]:
    """Ids of the tokens the tokenizer splits out of the text before anything else (added tokens)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(int(i) for i in decoder)


def _window(text: str, probe: str, ids, offsets, added: set[int]) -> tuple[int, int, int, int]:
    """(first token, end token) of the window in `ids` and its (start, end) characters in `text`."""
    c = _common_text_prefix(text, probe)
    s = _common_text_suffix(text, probe, min(len(text), len(probe)) - c)
    lo, w = 0, 0
    for t in range(len(ids)):
        if offsets[t][1] > c:
            break
        if ids[t] in added:
            lo, w = t + 1, offsets[t][1]
    hi, e = len(ids), len(text)
    for t in range(len(ids) - 1, lo - 1, -1):
        if offsets[t][0] < len(text) - s:
            break
        if ids[t] in added:
            hi, e = t, offsets[t][0]
    return lo, hi, w, e


def _common_text_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings (binary search on C-level comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_text_suffix(a: str, b: str, limit: int) -> int:
    lo, hi = 0, max(0, limit)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _prompt_key(conv) -> str:
    """The conversation without the last message's content (what the probe renderings depend on)."""
    head = list(conv[:-1]) + [{k: v for k, v in conv[-1].items() if k != "content"}]
    return json.dumps(head, sort_keys=True, default=str, ensure_ascii=False)
