"""OpenRLHF queries (text) -> the token ids the server scores, one Sample per query.

Two query formats, each saying what it scores:

* `templated` (OpenRLHF's convention): the query is chat-templated text (the policy's prompt, as
  OpenRLHF rendered it, + the response); it is scored as sent: pads dropped, the end made the
  reward model's end of an assistant turn. What the policy saw and wrote, which is not always what
  the reward model was trained on (Qwen3's template adds an empty think block before a plain answer
  and rewrites leading newlines and think blocks; a policy's text has none of that).
* `conversation` (`plain` is its old name): the response is taken out of the query (what follows
  the prompt, less a trailing EOS) and the conversation is rendered by the reward model's OWN chat
  template, exactly as `Scorer.score` renders it, i.e. what the model was trained on. `prompts` are
  either the user's text (then [system], user, assistant are rendered through the chat path,
  themis_engine.chat) or this same template's rendering of the conversation with its generation
  prompt (OpenRLHF's --data.apply_chat_template with a policy of the reward model's family): then
  the prompt is kept and the answer rendered after it as the template renders an answer.

A prompt that is not a prefix of its query (OpenRLHF cuts long prompts from the left but still
sends the whole prompt) is never refused: the query's start is matched against the prompt's end,
the response is what follows, and the query is scored on its own, never grouped (templated: the
query as sent; plain: the whole prompt + that response where it fits max_length, else the prompt's
part in the query, cut further from the left if need be), logged and counted (`prompt_mismatch`). Over max_length both
formats cut the answer from the right and keep the closing tokens (chat.fit, the Scorer's cut).
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
    """Turns OpenRLHF queries (and prompts) into token ids (see the module docstring).

    max_length: the longest sequence in tokens (the scorer's own max_length). Not thread-safe (the
    tokenizer's settings): the server calls it from one thread. Counters: `truncated` (queries
    cut to max_length), `prompt_mismatch` (queries that do not start with their whole prompt).
    """

    def __init__(self, tokenizer, max_length: int, query_format: str = "templated", system: str | None = None):
        query_format = {"plain": "conversation"}.get(query_format, query_format)  # plain: the old name
        if query_format not in ("templated", "conversation"):
            raise ValueError(f"query_format must be 'templated' or 'conversation', got {query_format!r}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.query_format = query_format
        self.system = system
        self.pad = tokenizer.pad_token or ""
        self.eos = tokenizer.eos_token or ""
        self.closing_ids = self._assistant_closing()
        self.closing = tokenizer.decode(self.closing_ids) if self.closing_ids else self.eos
        self.truncated = 0
        self.prompt_mismatch = 0

    def _assistant_closing(self) -> list[int]:
        """The ids the chat template writes after an assistant turn (ChatML: <|im_end|> \\n)."""
        try:
            return chat.turn_closing(self.tokenizer)
        except Exception as err:  # a template that cannot render a probe conversation: close with EOS
            logger.warning("chat template did not render a probe conversation (%s); closing with EOS", err)
            return self.encode(self.eos) if self.eos else []

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no special tokens added (the text already holds any BOS, as in Scorer)."""
        return chat.encode_many(self.tokenizer, [text])[0]

    def samples(self, query: list[str], prompts: list[str] | None) -> list[Sample]:
        """One Sample per query; RequestError(400) or InputError names the query that cannot be scored."""
        if self.query_format == "conversation" and prompts is None:
            raise RequestError(400, "query_format=conversation needs 'prompts' (one per query) to split each query")
        out: list[Sample] = []
        for i, q in enumerate(query):
            q = self._strip_pads(q)
            prompt = None if prompts is None else self._strip_pads(prompts[i], right=False)
            at, whole = (0, False) if prompt is None else self._prompt_end(q, prompt)
            if prompt is not None and not whole:
                self.prompt_mismatch += 1
                logger.warning("query %d does not start with its prompt (cut from the left by the client?): "
                               "scored alone, the response taken after %d matching characters", i, at)
            key = prompt if whole else None
            if self.query_format == "conversation":
                response = q[at:]
                if self.eos and response.endswith(self.eos):
                    response = response[: -len(self.eos)]
                if whole:
                    ids = self._conversation_ids(prompt, response, f"query {i}")
                else:
                    ids = self._mismatched_conversation_ids(prompt, q[:at], response, i)
                out.append(Sample(ids, key))
            else:
                out.append(Sample(self._templated_ids(self._close(q), q[:at] if at else None, i), key))
        return out

    def _conversation(self, user: str, response: str) -> list[dict]:
        conv = [{"role": "system", "content": self.system}] if self.system is not None else []
        return conv + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]

    def _generation_prompt(self) -> tuple[str, str] | None:
        """(the text the template adds for add_generation_prompt, a probe conversation's rendering up to
        and including it), or None where the template does not render one as a plain suffix."""
        if not hasattr(self, "_gen"):
            self._gen = None
            try:
                user = [{"role": "user", "content": "u"}]
                bare = self.tokenizer.apply_chat_template(user, tokenize=False)
                gen = self.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
                if gen.startswith(bare) and len(gen) > len(bare):
                    self._gen = (gen[len(bare):], gen)
            except Exception as err:  # noqa: BLE001 -- no generation prompt: prompts are read as user text
                logger.warning("chat template did not render a generation prompt (%s)", err)
        return self._gen

    def _rendered_answer(self, prompt: str, response: str) -> tuple[str, str] | None:
        """For a prompt that is this template's rendering of a conversation with its generation prompt
        (the policy shares the reward model's template: OpenRLHF's --data.apply_chat_template):
        (the prompt up to its generation prompt, the text the template renders for the answer from
        there: e.g. Qwen3's empty think block, the content as it rewrites it, the closing tokens).
        None for a prompt that is not such a rendering (raw user text)."""
        gen = self._generation_prompt()
        if gen is None:
            return None
        suffix, probe = gen
        at = prompt.rfind(suffix)
        if at < 0:
            return None
        probe_conv = [{"role": "user", "content": "u"}, {"role": "assistant", "content": response}]
        full = chat.render(self.tokenizer, probe_conv)
        if not full.startswith(probe):
            return None
        answer = full[len(probe):]
        head, tail = prompt[: at + len(suffix)], prompt[at + len(suffix):]
        # what the prompt holds after the generation prompt (Qwen3 without thinking: the empty think
        # block) must be where the template's answer rendering starts, else this is not its rendering
        if not answer.startswith(tail):
            return None
        return head, answer

    def _conversation_ids(self, prompt: str, response: str, what: str) -> list[int]:
        """The ids the reward model's own template gives the conversation (prompt, response), cut to
        max_length as chat.fit cuts. A raw prompt is the user turn ([system], user, assistant: exactly
        Scorer.score's ids); a prompt rendered by this template is taken as the rendered conversation."""
        rendered = self._rendered_answer(prompt, response)
        if rendered is None:
            (e,) = chat.encode(self.tokenizer, [self._conversation(prompt, response)], self.max_length, "truncate",
                               [what], InputError, spans=False)
        else:
            head, answer = rendered
            ids = self.encode(head + answer)
            if not ids:
                raise RequestError(400, f"{what}: no tokens to score")
            n = len(self.closing_ids)
            closing_start = len(ids) - n if n and ids[-n:] == self.closing_ids else len(ids)
            start = min(chat.common_prefix(self.encode(head), ids), closing_start)
            e = chat.fit(chat.Encoded(ids, start, closing_start, len(ids)), self.max_length, what, InputError)
        if e.truncated:
            self._count_cut(what, e.full_length)
        return e.ids

    def _mismatched_conversation_ids(self, prompt: str, seen: str, response: str, i: int) -> list[int]:
        """A prompt the client cut from the left: the whole prompt + the response where that fits
        max_length, else the prompt's part in the query (what the policy saw), else that part cut
        further from the left until the prompt fits: a reward for every sample, never a refusal."""
        what = f"query {i}"
        for user in (prompt, seen):
            try:
                return self._conversation_ids(user, response, what)
            except InputError:
                continue
        user_ids = self.encode(seen)
        # the room the prompt has beside the template and the whole response (as the client cut it)
        room = self.max_length - len(self.encode(chat.render(self.tokenizer, self._conversation("", response))))
        for extra in (0, 8, 64):  # the decoded cut may merge into more tokens than counted
            user = self.tokenizer.decode(user_ids[max(0, len(user_ids) - room + extra):]) if room > extra else ""
            try:
                return self._conversation_ids(user, response, what)
            except InputError:
                continue
        raise InputError(f"{what}: the chat template alone is over max_length={self.max_length}")

    @staticmethod
    def _prompt_end(query: str, prompt: str) -> tuple[int, bool]:
        """(where the response starts in the query, whether the query starts with the whole prompt).
        Otherwise the longest end of the prompt the query starts with (a prompt cut from the left;
        a character the cut split decodes as U+FFFD and is passed over)."""
        if query.startswith(prompt):
            return len(prompt), True
        skip = len(query) - len(query.lstrip("\ufffd"))
        return skip + _overlap(prompt, query[skip:]), False

    def _templated_ids(self, text: str, prompt: str | None, i: int) -> list[int]:
        ids = self._nonempty(self.encode(text), i)
        if len(ids) <= self.max_length:
            return ids
        # the answer starts after the prompt's tokens (where the prompt is known)
        start = chat.common_prefix(self.encode(prompt), ids) if prompt else 0
        n = len(self.closing_ids)
        closing_start = len(ids) - n if n and ids[-n:] == self.closing_ids else len(ids)
        cut = chat.fit(chat.Encoded(ids, min(start, closing_start), closing_start, len(ids)), self.max_length,
                       f"query {i}", InputError)
        self._count_cut(f"query {i}", len(ids))
        return cut.ids

    @staticmethod
    def _nonempty(ids: list[int], i: int) -> list[int]:
        if not ids:
            raise RequestError(400, f"query {i}: no tokens to score")
        return ids

    def _count_cut(self, what: str, before: int) -> None:
        self.truncated += 1
        logger.warning("%s: %d tokens, cut to max_length=%d", what, before, self.max_length)

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


def _overlap(prompt: str, query: str) -> int:
    """Length of the longest suffix of `prompt` that is a prefix of `query` (prefix function, linear)."""
    n = min(len(prompt), len(query))
    s = query[:n] + "\x00" + prompt[len(prompt) - n:]
    fail = [0] * len(s)
    for j in range(1, len(s)):
        k = fail[j - 1]
        while k and s[j] != s[k]:
            k = fail[k - 1]
        if s[j] == s[k]:
            k += 1
        fail[j] = k
    k = fail[-1]
    while k and not query.startswith(prompt[len(prompt) - k:]):  # only if the separator occurs in the text
        k = fail[k - 1]
    return k
