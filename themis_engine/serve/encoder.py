"""OpenRLHF queries (text) -> the token ids the server scores, one Sample per query.

`templated` queries are already chat-templated text: pads are dropped, the end is made the RM
template's end of an assistant turn, and the text is encoded as is. `plain` queries are split into
prompt + response and rendered as a conversation by the chat module, exactly as Scorer.tokenize
renders it. Over max_length both are cut from the right with the template's closing tokens kept
(chat.fit_to_length / chat.truncate, the cut the Scorer makes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from themis_engine import chat
from themis_engine.errors import InputError

logger = logging.getLogger("themis_engine.serve")


class RequestError(Exception):
    """A request the server refuses; `status` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Sample:
    """One query, tokenized: ids (the whole scored sequence) and the key of its prompt group."""

    ids: list[int]
    group_key: str | None  # queries with the same key share their prompt prefix; None: alone


class QueryEncoder:
    """Turns OpenRLHF queries (and prompts) into token ids the way Scorer renders conversations.

    max_length: the longest sequence in tokens (the scorer's own max_length). Not thread-safe (the
    tokenizer's settings): the server calls it from one thread. `truncated` counts the queries cut.
    """

    _SENTINEL = "\x00themis-sentinel\x00"

    def __init__(self, tokenizer, max_length: int, query_format: str = "templated", system: str | None = None):
        if query_format not in ("templated", "plain"):
            raise ValueError(f"query_format must be 'templated' or 'plain', got {query_format!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.query_format = query_format
        self.system = system
        self.pad = tokenizer.pad_token or ""
        self.eos = tokenizer.eos_token or ""
        self.closing = self._assistant_closing()
        self.closing_ids = self.encode(self.closing) if self.closing else []
        self.truncated = 0

    def _assistant_closing(self) -> str:
        """What the chat template writes after an assistant message's content (ChatML: '<|im_end|>\\n')."""
        try:
            text = chat.render(
                self.tokenizer, [{"role": "user", "content": "u"}, {"role": "assistant", "content": self._SENTINEL}]
            )
            at = text.rfind(self._SENTINEL)
            if at >= 0:
                return text[at + len(self._SENTINEL):]
        except Exception as err:  # a template that cannot render this: fall back on EOS
            logger.warning("chat template did not render a probe conversation (%s); closing with EOS", err)
        return self.eos

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added (the text already holds any BOS, as in Scorer)."""
        return chat.encode_many(self.tokenizer, [text])[0]

    def samples(self, query: list[str], prompts: list[str] | None) -> list[Sample]:
        """One Sample per query; RequestError(400) or InputError names the query that cannot be scored."""
        if self.query_format == "plain" and prompts is None:
            raise RequestError(400, "query_format=plain needs 'prompts' (one per query) to split each query")
        out = []
        for i, q in enumerate(query):
            q = self._strip_pads(q)
            prompt = None
            if prompts is not None:
                prompt = self._strip_pads(prompts[i], right=False)
                if not q.startswith(prompt):
                    raise RequestError(400, f"query {i} does not start with its prompt (prompts[{i}])")
            if self.query_format == "plain":
                ids = self._plain_ids(prompt, q[len(prompt):], i)
            else:
                ids = self._templated_ids(self._close(q), prompt, i)
            out.append(Sample(ids, prompt))
        return out

    def _templated_ids(self, text: str, prompt: str | None, i: int) -> list[int]:
        ids = self._nonempty(self.encode(text), i)
        if len(ids) <= self.max_length:
            return ids
        # the answer starts after the prompt's tokens (where the prompt is known)
        start = chat.common_prefix(self.encode(prompt), ids) if prompt is not None else 0
        return self._count_cut(chat.fit_to_length(ids, start, self.closing_ids, self.max_length, f"query {i}",
                                                  InputError), i, len(ids))

    def _plain_ids(self, prompt: str, response: str, i: int) -> list[int]:
        if self.eos and response.endswith(self.eos):
            response = response[: -len(self.eos)]
        conv = [{"role": "system", "content": self.system}] if self.system is not None else []
        conv += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = chat.render(self.tokenizer, conv)
        ids = self._nonempty(self.encode(text), i)
        if len(ids) <= self.max_length:
            return ids
        return self._count_cut(chat.truncate(self.tokenizer, conv, text, ids, self.max_length, f"query {i}",
                                             InputError), i, len(ids))

    @staticmethod
    def _nonempty(ids: list[int], i: int) -> list[int]:
        if not ids:
            raise RequestError(400, f"query {i}: no tokens to score")
        return ids

    def _count_cut(self, ids: list[int], i: int, before: int) -> list[int]:
        self.truncated += 1
        logger.warning("query %d: %d tokens, cut to max_length=%d", i, before, self.max_length)
        return ids

    def _strip_pads(self, text: str, right: bool = True) -> str:
        if not self.pad:
            return text
        while text.startswith(self.pad):
            text = text[len(self.pad):]
        while right and text.endswith(self.pad):
            text = text[: -len(self.pad)]
        return text

    def _close(self, text: str) -> str:
        """End the text with exactly one assistant-turn closing."""
        if not self.closing or text.endswith(self.closing):
            return text
        if self.eos and self.closing.startswith(self.eos) and text.endswith(self.eos):
            return text + self.closing[len(self.eos):]
        return text + self.closing
