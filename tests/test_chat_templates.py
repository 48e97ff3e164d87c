"""Fidelity of the one chat path (`themis_engine.chat`) on the chat templates TRL ships.

Every plain-text chat template in trl/chat_templates/ (the non-`_training` ones: COVERED; SKIPPED
says why the others are left out) is put on one tiny byte-level BPE tokenizer that knows every
control token the templates use as a special token, with the bos/eos its model family sets (and,
where the family has a BOS, a post-processor that adds it, as Llama's does: a chat path that
encoded with special tokens would show a doubled BOS). On each template, the conversations of
CASES check the contract of themis_engine/chat.py:

1. ids: `chat.encode` == the template's own tokenization (`apply_chat_template(tokenize=True)`, and
   the rendered text encoded without special tokens);
2. spans: ids[:answer_start] is shared with the same conversation with another answer; the closing
   tokens are the template's (CLOSING_BY_PREFIX) whatever the answer; the span holds the answer's text as the
   template writes it (THINK_REWRITES where the template rewrites a think block) and, beyond it,
   whitespace only: no text of the prompt, even where the answer repeats the prompt's text;
3. the over-length cut (max_length), and a prompt that alone does not fit;
4. the LM targets: the span and the end-of-turn token.

llama3_2, gptoss and muse_glimmer write today's date (strftime_now): their renderings agree within a
test except across midnight.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

import pytest

from themis_engine import chat
from themis_engine.errors import InputError

# --- the templates -------------------------------------------------------------------------------

COVERED = (
    "cohere", "cohere2", "deepseek_r1_distill", "deepseekv3", "diffusion_gemma", "gemma", "gemma3",
    "gemma4", "gemma4_v2", "gemma4_v3", "gemma4_v4", "gemma4_v5", "glm4moe", "gptoss", "lfm2",
    "lfm2_2_5", "lfm2_2_5_v2", "lfm2_2_5_vl", "lfm2_v2", "llama3", "llama3_1", "llama3_2",
    "muse_glimmer", "nemotron_3_5_lightning", "nemotron_3_nano", "nemotron_3_super", "nemotron_3_ultra",
    "phi3", "phi3_5", "qwen2_5", "qwen2_5_vl", "qwen3", "qwen3_5_nothink", "qwen3_5_think", "qwen3_6",
    "qwen3_8", "qwen3_instruct_2507", "qwen3_vl",
)
# The vision templates above (qwen2_5_vl, qwen3_vl, lfm2_2_5_vl) and diffusion_gemma render a string
# content as text, so they are covered too. These cannot show a plain string answer at all:
SKIPPED = {
    "idefics3": "iterates message['content'] as a list of {type, text} parts: a string content renders "
                "as nothing ('Assistant: <end_of_utterance>'), the same for every answer",
    "smolvlm": "iterates message['content'] as a list of {type, text} parts: a string content renders "
               "as nothing ('Assistant: <end_of_utterance>'), the same for every answer",
    "llava_next": "reads message['content'][0]['text']: a string content raises UndefinedError",
}

# (template name prefix, bos_token, eos_token): as the model family's tokenizer sets them
BOS_EOS = (
    ("cohere", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"),
    ("deepseek", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    ("diffusion_gemma", "<bos>", "<eos>"),
    ("gemma", "<bos>", "<eos>"),
    ("glm4moe", None, "<|endoftext|>"),
    ("gptoss", "<|startoftext|>", "<|return|>"),
    ("lfm2", "<|startoftext|>", "<|im_end|>"),
    ("llama3", "<|begin_of_text|>", "<|eot_id|>"),
    ("muse_glimmer", "<|begin_of_text|>", "<|eot|>"),
    ("nemotron", None, "<|im_end|>"),
    ("phi3", "<s>", "<|endoftext|>"),
    ("qwen", None, "<|im_end|>"),
    ("idefics3", None, "<end_of_utterance>"),  # (skipped ones)
    ("llava_next", "<s>", "</s>"),
    ("smolvlm", None, "<end_of_utterance>"),
)

# What each template writes after the last assistant turn's content: the closing tokens, whose first
# is the end-of-turn token (an LM target). glm4moe writes nothing after the answer.
CLOSING_BY_PREFIX = (
    ("cohere2", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
    ("cohere", "<|END_OF_TURN_TOKEN|>"),
    ("deepseek", "<｜end▁of▁sentence｜>"),
    ("diffusion_gemma", "<turn|>\n"),
    ("gemma4", "<turn|>\n"),
    ("gemma", "<end_of_turn>\n"),
    ("glm4moe", ""),
    ("gptoss", "<|return|>"),
    ("lfm2", "<|im_end|>\n"),
    ("llama3", "<|eot_id|>"),
    ("muse_glimmer", "<|eot|>"),
    ("nemotron", "<|im_end|>\n"),
    ("phi3", "<|end|>\n<|endoftext|>"),
    ("qwen", "<|im_end|>\n"),
)

# Control tokens of the templates, found in the template files.
CONTROL_TOKEN_PATTERNS = (
    r"<\|[^|<>\s]+\|>",              # <|im_start|>, <|eot_id|>, <|START_OF_TURN_TOKEN|>, <|"|>
    r"<｜[^｜]+｜>",                   # DeepSeek: <｜User｜>, <｜end▁of▁sentence｜>
    r"<\|[a-z_]+>", r"<[a-z_]+\|>",  # Gemma 4: <|turn> ... <turn|>, <|channel> ... <channel|>
    r"<(?:start|end)_of_turn>", r"<end_of_utterance>", r"</?think>",
    r"\[/?INST\]", r"<</?SYS>>", r"\[gMASK\]", r"<sop>",
)


def _templates_dir() -> Path:
    """trl/chat_templates, found without importing trl; skipped (failed under CI) without trl."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        from helpers import require_client

        require_client("trl", "bash .ci/clients/trl.sh")
        pytest.skip("trl not importable")
    return Path(list(spec.submodule_search_locations)[0]) / "chat_templates"


@lru_cache(maxsize=None)
def _template(name: str) -> str:
    return (_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")


def _by_prefix(table, name):
    for row in table:
        if name.startswith(row[0]):
            return row[1:]
    raise KeyError(name)


def _closing(name: str) -> str:
    return _by_prefix(CLOSING_BY_PREFIX, name)[0]


# --- the conversations ---------------------------------------------------------------------------

PROMPT = "Write a function that returns the sum of a list of numbers."
AGAIN = "Again, please."
SYSTEM = "You are a helpful assistant that judges the quality of code."
CODE = "```python\ndef add(a, b):\n    return a - b\n```"
ECHO_PROMPT = f"Fix the bug in this code:\n{CODE}"
PLAIN = "def add(a, b):\n    return a + b"
OTHER, OTHER2 = "Sure, here it is", "Maybe later!"  # other answers to the same prompt
LONG = " ".join(
    "def sum list value index buffer query user input sort fast slow memory loop array map".split() * 4
)


def _conv(answer: str, prompt: str = PROMPT, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


CASES = {
    "plain": _conv(PLAIN),
    "newlines": _conv("\n\nreturn sum(xs)\n\n"),
    "crlf": _conv("line one\r\nline two\r\n"),
    "tabs": _conv("\tif x:\n\t\treturn 1\t"),
    "unicode": _conv("Grüße, 你好世界 🙂 ü"),
    "think_inline": _conv("<think>plan</think>code"),
    "think_newlines": _conv("<think>\nplan\n</think>\n\ncode"),
    "think_in_string": _conv('print("</think>")'),
    "echo": _conv(CODE, prompt=ECHO_PROMPT),  # the answer repeats the prompt's code block
    "multi_turn": [  # an earlier assistant turn equal to the last answer
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": PLAIN},
        {"role": "user", "content": AGAIN},
        {"role": "assistant", "content": PLAIN},
    ],
    "system": _conv(PLAIN, system=SYSTEM),
    "empty": _conv(""),
    "blank": _conv("\n \n"),  # whitespace only: the templates that strip render it as the empty answer
    "one_char": _conv("x"),
    "long": _conv(LONG),
}

# (template, case) the template refuses to render: chat.encode must raise InputError naming it.
CANNOT_RENDER = {("gemma", "system")}  # "System role not supported"

# Where a template rewrites a think block: the text its span must hold (after the opening the template
# writes for every answer, e.g. Qwen3's `<think>\n`), and text it drops (must not be in the span).
# (The `\n` of Qwen3's `<think>\n` is in the span, `\nplan\n</think>\n\ncode`, as with the real Qwen3
# tokenizer: the probes' empty think block `<think>\n\n</think>` writes it inside one `\n\n` token.)
THINK_REWRITES = {
    # content.split('</think>')[-1]: the reasoning is dropped
    "deepseek": {
        "think_inline": ("code", "plan"),
        "think_newlines": ("\n\ncode", "plan"),
        "think_in_string": ('")', "print"),
    },
    # reasoning_content moved into the think block the template writes for every answer
    "qwen3": {
        "think_inline": ("plan\n</think>\n\ncode", None),
        "think_newlines": ("plan\n</think>\n\ncode", None),
        "think_in_string": ('print("\n</think>\n\n")', None),
    },
    "glm4moe": {
        "think_inline": ("plan</think>\ncode", None),
        "think_newlines": ("plan</think>\ncode", None),
        "think_in_string": ('print("</think>\n")', None),
    },
    # the answer's own think block replaces the empty `<think></think>` the template writes
    "nemotron": {
        "think_inline": ("plan</think>code", None),
        "think_newlines": ("\nplan\n</think>\n\ncode", None),
        "think_in_string": ('print("</think>")', None),
    },
}
THINK_FAMILY = {
    "deepseek_r1_distill": "deepseek", "deepseekv3": "deepseek", "glm4moe": "glm4moe",
    "qwen3": "qwen3", "qwen3_5_think": "qwen3", "qwen3_5_nothink": "qwen3", "qwen3_6": "qwen3",
    "nemotron_3_5_lightning": "nemotron", "nemotron_3_nano": "nemotron", "nemotron_3_super": "nemotron",
    "nemotron_3_ultra": "nemotron",
}


def _expected_span_text(name: str, case: str) -> tuple[str, str | None]:
    """(text the answer's span must contain, text it must not contain)."""
    rewrite = THINK_REWRITES.get(THINK_FAMILY.get(name, ""), {}).get(case)
    if rewrite is not None:
        return rewrite
    # the templates copy the content, some of them stripped (Gemma, Llama 3, Cohere, Qwen3.5 ...)
    return CASES[case][-1]["content"].strip(), None


# --- the tokenizer -------------------------------------------------------------------------------

_CORPUS = [
    PROMPT, SYSTEM, ECHO_PROMPT, PLAIN, OTHER, LONG, AGAIN,
    "system\nuser\nassistant\nmodel\n\n", "<think>\nplan\n</think>\n\ncode",
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
    "You are a helpful assistant. Knowledge cutoff: 2024-06. Reasoning: medium.",
]


def _control_tokens() -> list[str]:
    found = set()
    for path in sorted(_templates_dir().glob("*.jinja")):
        text = path.read_text(encoding="utf-8")
        for pattern in CONTROL_TOKEN_PATTERNS:
            found.update(re.findall(pattern, text))
    found.update(t for _, bos, eos in BOS_EOS for t in (bos, eos) if t)
    return sorted(found)


@lru_cache(maxsize=None)
def _base_tokenizer() -> str:
    """One small byte-level BPE (as themis_engine.testing.tiny trains one) with every control token of
    the templates as a special token; its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=_control_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


@lru_cache(maxsize=None)
def _tokenizer(name: str):
    """The tiny tokenizer with template `name`, its family's bos/eos, and a BOS-adding post-processor
    where the family has a BOS."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = _by_prefix(BOS_EOS, name)
    tok = Tokenizer.from_str(_base_tokenizer())
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, chat_template=_template(name),
        clean_up_tokenization_spaces=False,
    )


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _template_ids(tok, conv) -> list[int]:
    out = tok.apply_chat_template(conv, tokenize=True)
    if not isinstance(out, list):  # transformers 5: a BatchEncoding
        out = out["input_ids"]
    return list(out)


@lru_cache(maxsize=None)
def _full(name: str, case: str) -> chat.Encoded:
    (enc,) = chat.encode(_tokenizer(name), [CASES[case]], names=[f"{name}/{case}"])
    return enc


def _with_answers(name: str, conv: list[dict], *answers: str) -> list[chat.Encoded]:
    """The conversation with other last answers (one chat.encode call: they share the probes)."""
    return chat.encode(_tokenizer(name), [conv[:-1] + [dict(conv[-1], content=x)] for x in answers])


RENDERED = [(n, c) for n in COVERED for c in CASES if (n, c) not in CANNOT_RENDER]


# --- the tests -----------------------------------------------------------------------------------


def test_every_template_is_covered_or_skipped():
    names = {p.stem for p in _templates_dir().glob("*.jinja") if not p.stem.endswith("_training")}
    assert names == set(COVERED) | set(SKIPPED), (
        f"new: {sorted(names - set(COVERED) - set(SKIPPED))}, gone: {sorted(set(COVERED) | set(SKIPPED) - names)}"
    )


def test_tokenizer_knows_the_control_tokens():
    tokens = _control_tokens()
    for t in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<｜Assistant｜>", "<start_of_turn>",
              "<|turn>", "<turn|>", "<|eot_id|>", "<|START_OF_TURN_TOKEN|>", "[gMASK]", "<sop>"):
        assert t in tokens
    tok = _tokenizer("qwen3")
    for t in tokens:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t


SKIPPED_ERROR = {  # what chat.encode says of them
    "idefics3": "renders the same tokens for any answer",
    "smolvlm": "renders the same tokens for any answer",
    "llava_next": "could not render it",
}


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_skipped_templates_cannot_show_a_string_answer(name):
    with pytest.raises(InputError, match=f"{name}/plain: the chat template {SKIPPED_ERROR[name]}"):
        chat.encode(_tokenizer(name), [CASES["plain"]], names=[f"{name}/plain"])


@pytest.mark.parametrize("name,case", sorted(CANNOT_RENDER))
def test_unrenderable_is_an_input_error(name, case):
    tok = _tokenizer(name)
    with pytest.raises(Exception):
        tok.apply_chat_template(CASES[case], tokenize=False)
    with pytest.raises(InputError, match=f"{name}/{case}: the chat template could not render it"):
        chat.encode(tok, [CASES[case]], names=[f"{name}/{case}"])


@pytest.mark.parametrize("name,case", RENDERED)
def test_ids_are_the_templates_tokenization(name, case):
    tok, conv = _tokenizer(name), CASES[case]
    enc = _full(name, case)
    assert enc.ids == _template_ids(tok, conv)
    text = tok.apply_chat_template(conv, tokenize=False)
    assert enc.ids == tok(text, add_special_tokens=False)["input_ids"]
    assert _decode(tok, enc.ids) == text
    assert enc.full_length == len(enc.ids) and not enc.truncated
    bos = tok.bos_token
    if bos is not None and text.startswith(bos):  # the template holds the BOS: exactly one
        assert tok("x")["input_ids"][0] == tok.bos_token_id  # (the post-processor would add one)
        assert enc.ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("name,case", RENDERED)
def test_spans(name, case):
    tok, conv = _tokenizer(name), CASES[case]
    enc = _full(name, case)
    ids, a, c = enc.ids, enc.answer_start, enc.closing_start
    assert 0 < a <= c <= len(ids)
    # the closing tokens are the template's, whatever the answer
    assert _decode(tok, ids[c:]) == _closing(name)
    span = _decode(tok, ids[a:c])
    empty = conv[:-1] + [dict(conv[-1], content="")]
    if tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(empty, tokenize=False):
        # the template writes nothing for this answer: "An empty answer has an empty span" (chat.py).
        # Fails where the template's text before the answer ends in a token that only exists with
        # nothing after it (byte-level BPE's "\n\n" before <|eot_id|>, "\n", "\n", "a" before a probe):
        # chat.encode puts that token of the template's text in the span (and in the LM targets).
        assert a == c, f"{name}/{case}: an empty answer has an empty span, got {span!r} {ids[a:c]}"
        return
    # the prompt part is the same tokens for another answer, and ends where the first token that
    # depends on the answer starts: the ids of two other answers part from these there
    other, other2 = _with_answers(name, conv, OTHER, OTHER2)
    other_ids, other_start, other2_ids = other.ids, other.answer_start, other2.ids
    assert other_ids[:a] == ids[:a]
    assert a == min(chat.common_prefix(ids, other_ids), chat.common_prefix(ids, other2_ids))
    want, dropped = _expected_span_text(name, case)
    assert want in span, f"{name}/{case}: span {span!r} does not hold {want!r}"
    assert not span.replace(want, "", 1).strip(), f"{name}/{case}: span {span!r} holds more than {want!r}"
    if dropped is not None:
        assert dropped not in span
    if case == "echo":  # the prompt's copy of the answer's text is not part of the answer
        assert a == other_start
        assert "Fix the bug" not in span and ECHO_PROMPT in _decode(tok, ids[:a])
    if case == "multi_turn":  # the LAST turn is the scored one; the earlier equal answer is prompt
        assert a == other_start
        prompt = _decode(tok, ids[:a])
        assert PLAIN in prompt and AGAIN in prompt[prompt.index(PLAIN):]


@pytest.mark.parametrize("name,case", RENDERED)
def test_targets(name, case):
    enc = _full(name, case)
    ids, a, c = enc.ids, enc.answer_start, enc.closing_start
    assert enc.targets == ids[a:c] + ids[c:c + 1]
    assert enc.target_end == min(c + 1, len(ids))


def _cut(name, case, max_length, spans=True):
    (enc,) = chat.encode(_tokenizer(name), [CASES[case]], max_length, names=[f"{name}/{case}"], spans=spans)
    return enc


@pytest.mark.parametrize("name,case", RENDERED)
def test_cut(name, case):
    full = _full(name, case)
    ids, a, c = full.ids, full.answer_start, full.closing_start
    closing = ids[c:]
    n_close, n_answer = len(closing), c - a
    lengths = []
    if n_answer >= 4:
        lengths.append(full.full_length - 3)
    if n_answer >= 2:
        lengths.append(a + 1 + n_close)  # one answer token left
    for max_length in lengths:
        enc = _cut(name, case, max_length)
        keep = max_length - n_close
        assert enc.ids == ids[:keep] + closing, (name, case, max_length)
        assert len(enc.ids) == max_length and enc.truncated and enc.full_length == full.full_length
        assert enc.ids[:a] == ids[:a] and enc.answer_start == a and enc.closing_start == keep
        assert enc.targets == ids[a:keep] + closing[:1]
    # at the full length nothing is cut
    assert _cut(name, case, full.full_length, spans=False).ids == ids
    # the prompt (and one answer token, where there is an answer) does not fit: an error naming the item
    too_short = a + n_close if n_answer else full.full_length - 1
    with pytest.raises(InputError, match=rf"{name}/{case}: the prompt alone is {a} tokens"):
        _cut(name, case, too_short)


@pytest.mark.parametrize("name", COVERED)
def test_batch_and_turn_closing(name):
    tok = _tokenizer(name)
    cases = [c for c in CASES if (name, c) not in CANNOT_RENDER]
    batch = chat.encode(tok, [CASES[c] for c in cases], names=[f"{name}/{c}" for c in cases])
    assert batch == [_full(name, c) for c in cases]
    no_spans = chat.encode(tok, [CASES[c] for c in cases], spans=False)
    assert [e.ids for e in no_spans] == [e.ids for e in batch]
    assert all(e.answer_start is None and e.closing_start is None for e in no_spans)
    assert _decode(tok, chat.turn_closing(tok)) == _closing(name)
