"""See what is trained and scored: the tokens, spans, heads and LM targets of preference pairs.

    records = preview_pairs(pairs, tokenizer, max_length, system_prompts=..., criteria=..., rows=[3, 17])
    print(format_preview(records, tokenizer, color=sys.stdout.isatty()))

    python -m themis_engine.data preview --config run.yaml --rows 3,17,42        # as training reads it
    python -m themis_engine.data preview --for eval path/to/rm --data crb.jsonl --use-aspect-prompts --json

Nothing here computes tokens its own way. Each side of a pair is made into a conversation by
`tokenize.conversations` and encoded by the one chat path (`chat.encode`, what `Scorer.encode`
runs); for training the pair also goes through `tokenize_pairs` (the function the token store is
built with), and its ids, answer starts, LM-target end and criterion index are the ones reported.
The shared prefix is the packer's (`packing.shared_prefix_len`), the packed token count the
planner's (`packing.group_token_counts`). The configuration-level entry points, which pick the
system prompt and the head of each row exactly as a run does, are
`themis_engine.train.trainer.preview_data(cfg)` and `themis_engine.eval.run.preview_data(cfg)`;
the command line is `python -m themis_engine.data preview` (themis_engine/data/__main__.py).

One record (a JSON object; `--json` writes one per line) per pair shown. Token positions count
from 0 in that side's standalone sequence (what the model reads for it); a span [a, b) holds the
tokens a .. b-1.

    row            the pair's position in the data as read, counted from 1 (the file's row number
                   when no row was skipped while loading); `--rows` takes these numbers
    source         where the pair came from ("file.jsonl:row 17"); id: the row's id column or null
    purpose        "train" (tokenized as the trainer's token store) or "eval" (as the evaluator scores)
    split          training: "train" or "held-out" (data.eval_fraction, or the data.eval files);
                   evaluation: "eval"
    status         "kept" (trained on / scored) or "skipped" (the trainer drops it; see reason)
    reason         why a pair is skipped, else null
    notes          remarks in words: what the over-length cut did, identical answers, ...
    system         the system message the pair is rendered with (null: none)
    system_kind    where it comes from: "none", "row" (the row's own `system`), "all" (the
                   all-criteria prompt), "own" (the prompt of the pair's criterion), or "all+row" /
                   "own+row" (a criteria prompt, a blank line, then the row's own system text)
    aspect, language, margin   the row's values (margin: 0.0 when the row has none)
    aspect_index   training: the index of the pair's aspect in the run's criteria (-1: none);
                   evaluation: null
    heads          the reward heads the pair trains (training: its aspect's head, every head when it
                   has no aspect or the model has one head; none when it is skipped) or is scored on
                   (evaluation), by name
    head_index     the same heads as indices into the model's heads
    prefix_len     tokens the two sides share in the packed stream, computed once: their longest
                   common token prefix, capped so that each side keeps at least one token (the packer's)
    diverge_at     the first position where chosen and rejected differ (chat.common_prefix); equal to
                   prefix_len unless one side is a prefix of the other
    lm_loss        whether the run has an LM loss (objective.lm_coef > 0; never for evaluation)
    target_mask    with lm_loss: one 0/1 per chosen token, 1 where that token is an LM label (the
                   trainer predicts it from the tokens before it): the chosen answer's tokens and the
                   end-of-turn token, never the prompt (the first token of a sequence is never a
                   label); null without lm_loss and for a skipped pair
    target_span    with lm_loss: [first, end) of the 1s of target_mask; null where target_mask is
    truncated      whether a side was cut to max_length
    tokens         counts: prefix (= prefix_len), chosen / rejected (each side's standalone length),
                   chosen_suffix / rejected_suffix (what each adds after the prefix), packed (the
                   tokens this pair puts in a packed micro-batch: prefix once, both suffixes),
                   padded (two rows padded to the longer side), standalone (chosen + rejected);
                   null when a side was skipped over max_length
    chosen, rejected   one object per side (null for a side skipped over max_length):
        ids          the token ids of the standalone sequence, after any cut
        length       len(ids); full_length: the tokens before the cut; cut: full_length - length
        cut_message  the index (in the conversation) of the message whose answer was cut: always the
                     last, the scored assistant turn; null when nothing was cut
        answer       [answer_start, closing_start): the tokens the chat template writes for the
                     scored answer (Qwen3: the rewritten think block and the text; not the empty
                     think block the template adds to every answer)
        closing      [closing_start, length): the template's closing tokens (`<|im_end|>`, `\\n`)
        suffix       [prefix_len, length): the side's own tokens in the packed stream
        score_at     length - 1: the token whose hidden state gives the side's rewards

The text form (`format_preview`) shows the same: the conversation as the chat template renders it,
the shared prefix once, then the chosen and the rejected continuations, with the answer's bounds,
the cut and the LM targets marked inline (colours on a terminal, the markers below otherwise):

    ⟨answer⟩ … ⟨/answer⟩    the scored answer's tokens
    ⟦ … ⟧                   LM targets (with the LM loss on)
    ⟨✂ N tokens cut⟩        where the over-length cut removed N answer tokens (closing tokens kept)
"""

from __future__ import annotations

import json
from typing import Callable, Iterable, Iterator, Sequence

from themis_engine import chat
from themis_engine.data.prompts import PROMPT_ALL, PROMPT_NONE, PROMPT_OWN
from themis_engine.data.schemas import PreferencePair
from themis_engine.data.tokenize import conversations, tokenize_pairs
from themis_engine.errors import DataError
from themis_engine.fileio import atomic_write

__all__ = ["PURPOSES", "SYSTEM_KINDS", "format_preview", "iter_preview_pairs", "lm_target_span", "preview_pairs",
           "select_rows", "summary",
           "system_kind", "write_jsonl"]

PURPOSES = ("train", "eval")
ENCODE_PAIRS = 128  # pairs encoded at a time (as the token store's shards are)
SYSTEM_KINDS = ("none", "row", "all", "own", "all+row", "own+row")


# ============================================================================================ records
def preview_pairs(pairs: Sequence[PreferencePair], tokenizer, max_length: int, **options) -> list[dict]:
    """The preview records (module docstring) of some of `pairs`, in the order asked for, as a list
    (the options: iter_preview_pairs')."""
    return list(iter_preview_pairs(pairs, tokenizer, max_length, **options))


def iter_preview_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    *,
    system_prompts: Sequence[str | None] | None = None,
    system_kinds: Sequence[str] | None = None,
    criteria: Sequence[str] | None = None,
    head_names: Sequence[str] = (),
    heads_for: Callable[[int, int], Sequence[int]] | None = None,
    splits: Sequence[str] | None = None,
    rows: Sequence[int] | None = None,
    first: int | None = 3,
    on_overflow: str = "truncate",
    lm_loss: bool = False,
    purpose: str = "train",
    what: str = "the data",
) -> Iterator[dict]:
    """The preview records (module docstring) of some of `pairs`, in the order asked for, made
    ENCODE_PAIRS pairs at a time (the memory of a whole-file preview is one piece's, when the
    records are written as they come: write_jsonl).

    system_prompts: the system message of each pair (None: each pair's own `system`), as given to
    tokenize_pairs / Scorer.score_pairs; system_kinds: where each comes from (SYSTEM_KINDS; None:
    "row" or "none"). criteria: the run's criteria, for aspect_index (tokenize_pairs'). head_names:
    the model's heads; heads_for(i, aspect_index): the head indices pair i trains or is scored on.
    splits: each pair's split name. rows: the pairs to show, counted from 1 (DataError naming a row
    out of range and the number of rows); None: the first `first` (None or 0: every pair).
    on_overflow, max_length: as the run's. lm_loss: whether LM targets are reported.
    purpose: "train" (also through tokenize_pairs: identical sides are skipped) or "eval" (scored
    whatever they are). what: how errors name the data (its files).
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    n = len(pairs)
    for name, values in (("system_prompts", system_prompts), ("system_kinds", system_kinds), ("splits", splits)):
        if values is not None and len(values) != n:
            raise ValueError(f"{len(values)} {name} for {n} pairs")
    chosen_rows = select_rows(n, rows, first, what)
    systems = [p.system for p in pairs] if system_prompts is None else list(system_prompts)
    kinds = [system_kind(None, p.system) for p in pairs] if system_kinds is None else list(system_kinds)

    # the rows are checked now (a DataError before any record); the records are made as they are read
    return (record for lo in range(0, len(chosen_rows), ENCODE_PAIRS)
            for record in _piece(pairs, chosen_rows[lo : lo + ENCODE_PAIRS], tokenizer, max_length, systems, kinds,
                                 criteria, head_names, heads_for, splits, on_overflow, lm_loss, purpose))


def _piece(pairs, chosen_rows, tokenizer, max_length, systems, kinds, criteria, head_names, heads_for, splits,
           on_overflow, lm_loss, purpose) -> list[dict]:
    convs, names = [], []
    for i in chosen_rows:
        for side, conv in zip(("chosen", "rejected"), conversations(pairs[i], systems[i])):
            convs.append(conv)
            names.append(f"{pairs[i].source or f'row {i + 1}'} ({side})")
    encoded = chat.encode(tokenizer, convs, max_length, on_overflow, names, DataError, spans=True)

    trained = {}
    if purpose == "train":  # the token store's own function: what the trainer maps is what is shown
        tokenized, _ = tokenize_pairs([pairs[i] for i in chosen_rows], tokenizer, max_length,
                                      [systems[i] for i in chosen_rows], criteria, on_overflow=on_overflow)
        trained = {chosen_rows[t.index]: t for t in tokenized}

    out = []
    for k, i in enumerate(chosen_rows):
        c, r = encoded[2 * k], encoded[2 * k + 1]
        t = trained.get(i)
        if t is not None and (t.chosen_ids, t.rejected_ids, t.chosen_response_start, t.rejected_response_start,
                              t.chosen_target_end) != (c.ids, r.ids, c.answer_start, r.answer_start, c.target_end):
            raise RuntimeError(f"{names[2 * k]}: the preview and tokenize_pairs disagree (a bug)")
        record = _record(pairs[i], i, c, r, t, convs[2 * k: 2 * k + 2], purpose, on_overflow, lm_loss)
        record["split"] = splits[i] if splits is not None else ("eval" if purpose == "eval" else "train")
        record["system"], record["system_kind"] = systems[i], kinds[i]
        index = []  # a pair the trainer drops trains no head
        if heads_for is not None and record["status"] == "kept":
            index = list(heads_for(i, record["aspect_index"] if record["aspect_index"] is not None else -1))
        record["head_index"] = [int(h) for h in index]
        record["heads"] = [head_names[h] if 0 <= h < len(head_names) else str(h) for h in index]
        out.append({key: record[key] for key in _ORDER})
    return out


_ORDER = ("row", "source", "id", "purpose", "split", "status", "reason", "notes", "system", "system_kind", "aspect",
          "language", "margin", "aspect_index", "heads", "head_index", "prefix_len", "diverge_at", "lm_loss",
          "target_mask", "target_span", "truncated", "tokens", "chosen", "rejected")


def _record(pair, i, c, r, t, convs, purpose, on_overflow, lm_loss) -> dict:
    from themis_engine import packing

    rec = dict(row=i + 1, source=pair.source or None, id=pair.id, purpose=purpose, status="kept", reason=None,
               notes=[], aspect=pair.aspect, language=pair.language,
               margin=float(pair.margin) if pair.margin is not None else 0.0,
               aspect_index=(t.aspect_index if t is not None else None) if purpose == "train" else None,
               lm_loss=bool(lm_loss and purpose == "train"), target_mask=None, target_span=None)
    if c is None or r is None:  # on_overflow="skip"
        rec.update(status="skipped", reason=f"a side is over max_length (on_overflow={on_overflow!r}): the pair is "
                                             "left out", prefix_len=0, diverge_at=0, truncated=False, tokens=None,
                   chosen=_side(c, 0, len(convs[0]) - 1), rejected=_side(r, 0, len(convs[1]) - 1))
        return rec
    prefix_len = packing.shared_prefix_len([c.ids, r.ids])
    tokens, seq_offsets, group_offsets = packing.flatten_groups([[c.ids, r.ids]])
    packed = int(packing.group_token_counts(seq_offsets, group_offsets, [prefix_len])[0])
    rec.update(prefix_len=prefix_len, diverge_at=chat.common_prefix(c.ids, r.ids),
               truncated=c.truncated or r.truncated, chosen=_side(c, prefix_len, len(convs[0]) - 1),
               rejected=_side(r, prefix_len, len(convs[1]) - 1))
    rec["tokens"] = dict(prefix=prefix_len, chosen=len(c.ids), rejected=len(r.ids),
                         chosen_suffix=len(c.ids) - prefix_len, rejected_suffix=len(r.ids) - prefix_len,
                         packed=packed, padded=2 * max(len(c.ids), len(r.ids)), standalone=len(c.ids) + len(r.ids))
    for side, e, conv in (("chosen", c, convs[0]), ("rejected", r, convs[1])):
        if e.truncated:
            rec["notes"].append(f"{side}: {e.full_length - len(e.ids)} tokens cut ({e.full_length} -> {len(e.ids)}) "
                                f"from the end of the answer of message {len(conv) - 1} (the scored assistant turn); "
                                "the closing tokens are kept")
    if c.ids == r.ids:
        if purpose == "train":
            rec.update(status="skipped", reason="chosen and rejected are the same tokens" +
                       (" after the cut" if rec["truncated"] else "") + ": no preference, the trainer drops the pair")
        else:
            rec["notes"].append("chosen and rejected are the same tokens: scored alike, counted wrong")
    elif purpose == "eval" and pair.chosen == pair.rejected:
        rec["notes"].append("chosen and rejected are the same text: scored alike, counted wrong")
    if rec["lm_loss"] and t is not None:
        lo, hi = lm_target_span(t.chosen_response_start, t.chosen_target_end, len(t.chosen_ids))
        rec["target_mask"] = [int(lo <= j < hi) for j in range(len(t.chosen_ids))]
        rec["target_span"] = [lo, hi]
    return rec


def _side(e: chat.Encoded | None, prefix_len: int, last_message: int) -> dict | None:
    if e is None:
        return None
    n = len(e.ids)
    return dict(ids=list(e.ids), length=n, full_length=e.full_length, cut=e.full_length - n,
                cut_message=last_message if e.truncated else None, answer=[e.answer_start, e.closing_start],
                closing=[e.closing_start, n], suffix=[prefix_len, n], score_at=n - 1)


def lm_target_span(response_start: int, target_end: int, length: int) -> tuple[int, int]:
    """[first, end) of the chosen side's LM labels as the trainer takes them (train.microbatch:
    the tokens from the answer's start, never position 0, to chosen_target_end; -1: to the end)."""
    end = length if target_end < 0 else min(target_end, length)
    first = min(max(response_start, 1), end)
    return first, end


def select_rows(n: int, rows: Sequence[int] | None, first: int | None, what: str) -> list[int]:
    """0-based indices of the rows asked for (counted from 1 in `rows`); DataError naming a row that
    is not there and how many rows `what` has."""
    if rows:
        out = []
        for r in rows:
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= n:
                raise DataError(f"{what}: row {r!r} does not exist; it has {n} row{'s' if n != 1 else ''} "
                                "(rows are counted from 1)")
            out.append(r - 1)
        return out
    if first is not None and first < 0:
        raise DataError(f"{what}: first must be >= 0 rows (0: every row), got {first}")
    return list(range(n if not first else min(first, n)))


def system_kind(drawn: str | None, row_system: str | None) -> str:
    """The system_kind of a record: `drawn` is the criteria prompt drawn for the pair (prompts.PROMPT_*,
    None where none is drawn), row_system the row's own system text."""
    base = {None: "", PROMPT_NONE: "", PROMPT_ALL: "all", PROMPT_OWN: "own"}[drawn]
    if row_system:
        return f"{base}+row" if base else "row"
    return base or "none"


def write_jsonl(records: Iterable[dict], path) -> int:
    """The records as JSON lines (what --json prints), written atomically as they come (an iterator
    of records is never held whole); returns how many were written."""
    count = 0

    def write(tmp):
        nonlocal count
        count = 0
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                count += 1

    atomic_write(path, write)
    return count


# ============================================================================================ text
_KIND_WORDS = {"none": "none", "row": "the row's own", "all": "the all-criteria prompt",
               "own": "the prompt of the pair's criterion", "all+row": "the all-criteria prompt + the row's own",
               "own+row": "the prompt of the pair's criterion + the row's own"}
_RESET, _BOLD, _DIM, _UNDER = "\x1b[0m", "\x1b[1m", "\x1b[2m", "\x1b[4m"
_GREEN, _RED, _CYAN, _YELLOW = "\x1b[32m", "\x1b[31m", "\x1b[36m", "\x1b[33m"


def format_preview(records: Sequence[dict], tokenizer, color: bool = False) -> str:
    """The records as text for a terminal: per pair a header (split, system prompt, heads, token
    counts, cut, LM targets) and the rendered conversation, shared prefix once, then the chosen and
    the rejected continuations, with the answer, the cut and the LM targets marked (module docstring).
    color: ANSI colours (chosen green, rejected red, LM targets underlined) besides the markers."""
    blocks = [_format_record(rec, tokenizer, color) for rec in records]
    blocks.append(summary(records))
    return "\n\n".join(blocks) + "\n"


def summary(records: Sequence[dict]) -> str:
    """One line: pairs shown, kept / skipped, and the token counts packed vs padded."""
    kept = [r for r in records if r["status"] == "kept"]
    text = f"{len(records)} pair{'s' if len(records) != 1 else ''} shown: {len(kept)} kept"
    skipped = len(records) - len(kept)
    if skipped:
        text += f", {skipped} skipped"
    cut = sum(r["truncated"] for r in records)
    if cut:
        text += f", {cut} cut to max_length"
    counted = [r["tokens"] for r in kept]
    if counted:
        packed, padded = sum(t["packed"] for t in counted), sum(t["padded"] for t in counted)
        standalone = sum(t["standalone"] for t in counted)
        text += (f"; tokens: packed {packed} (prefixes once), standalone {standalone}, padded {padded} "
                 f"({1 - packed / padded:.0%} fewer packed than padded)")
    return text


def _paint(text: str, codes: str, color: bool) -> str:
    return f"{codes}{text}{_RESET}" if color and text else text


def _format_record(rec: dict, tokenizer, color: bool) -> str:
    title = [f"row {rec['row']}"]
    if rec["source"]:
        title.append(rec["source"])
    if rec["id"] is not None:
        title.append(f"id {rec['id']}")
    title.append(f"{rec['split']} split" if rec["purpose"] == "train" else "evaluation")
    title += [x for x in (rec["aspect"], rec["language"]) if x]
    lines = [_paint(" · ".join(title), _BOLD, color)]

    def field(name: str, text: str) -> None:
        lines.append(f"  {_paint(f'{name:<8}', _DIM, color)} {text}")

    if rec["status"] != "kept":
        field("SKIPPED", _paint(rec["reason"], _YELLOW, color))
    system = rec["system"]
    shown = "none" if system is None else f"{_KIND_WORDS.get(rec['system_kind'], rec['system_kind'])}: " + \
        json.dumps(system if len(system) <= 100 else system[:97] + "...", ensure_ascii=False)
    field("system", shown)
    if rec["heads"]:
        what = "trains" if rec["purpose"] == "train" else "scored by"
        heads = ", ".join(f"{h} (head {i})" for h, i in zip(rec["heads"], rec["head_index"]))
        field("heads", f"{what} {heads}" + ("  [no aspect: every head]" if rec["purpose"] == "train"
                                            and rec["aspect_index"] == -1 and len(rec["heads"]) > 1 else ""))
    t = rec["tokens"]
    if t is not None:
        field("tokens", f"prefix {t['prefix']} · chosen +{t['chosen_suffix']} = {t['chosen']} · rejected "
                        f"+{t['rejected_suffix']} = {t['rejected']} · packed {t['packed']} · padded {t['padded']} "
                        f"· standalone {t['standalone']}")
    for note in rec["notes"]:
        field("note", note)
    if rec["lm_loss"] and rec["target_span"] is not None:
        lo, hi = rec["target_span"]
        field("LM", f"{hi - lo} target tokens of the chosen side, positions {lo}-{hi - 1} (the answer and the "
                    f"end-of-turn token), {_paint('underlined', _UNDER, True) if color else 'marked ⟦ ⟧'}")
    c, r = rec["chosen"], rec["rejected"]
    if c is None or r is None:
        return "\n".join(lines)
    P = rec["prefix_len"]
    targets = set(range(*rec["target_span"])) if rec["target_span"] else set()
    # the shared prefix once, with the marks of both sides that fall in it (named by side where they differ)
    prefix_marks: dict[int, list[str]] = {}
    inside = {side: [(pos, m) for pos, m in _side_marks(s) if pos < P] for side, s in (("chosen", c), ("rejected", r))}
    if inside["chosen"] == inside["rejected"]:
        for pos, m in inside["chosen"]:
            prefix_marks.setdefault(pos, []).append(m)
    else:
        for side, found in inside.items():
            for pos, m in found:
                prefix_marks.setdefault(pos, []).append(m.replace("⟨", f"⟨{side} ", 1))
    lines.append(_rule(f"shared prefix · tokens 0-{P - 1} ({P}) · computed once", _CYAN, color))
    lines += _render_tokens(tokenizer, c["ids"], 0, P, prefix_marks, targets, "", color)
    for side, s, codes in (("chosen", c, _GREEN), ("rejected", r, _RED)):
        marks: dict[int, list[str]] = {}
        for pos, m in _side_marks(s):
            if pos >= P:
                marks.setdefault(pos, []).append(m)
        head = f"{side} · tokens {P}-{s['length'] - 1} (+{s['length'] - P}) · scored at {s['score_at']}"
        if side == "chosen":
            head += f" · the sides diverge at {rec['diverge_at']}"
        lines.append(_rule(head, codes, color))
        lines += _render_tokens(tokenizer, s["ids"], P, s["length"], marks, targets if side == "chosen" else set(),
                                codes, color)
    return "\n".join(lines)


def _side_marks(s: dict) -> list[tuple[int, str]]:
    """(position, marker) of one side: the answer's start, the cut (before the closing tokens), the answer's end."""
    a, e = s["answer"]
    out = [(a, "⟨answer⟩")]
    if s["cut"]:
        out.append((e, f"⟨✂ {s['cut']} tokens cut⟩"))
    out.append((e, "⟨/answer⟩"))
    return out


def _rule(text: str, codes: str, color: bool) -> str:
    return "  " + _paint(f"── {text} ──", codes + _BOLD, color)


def _render_tokens(tokenizer, ids, lo: int, hi: int, marks: dict[int, list[str]], targets: set, codes: str,
                   color: bool) -> list[str]:
    """Tokens ids[lo:hi] decoded in runs (split where a mark sits or an LM-target run starts or ends),
    each mark written before its position, LM targets between ⟦ ⟧ (underlined in colour); as lines
    behind a bar."""
    if hi <= lo:
        return ["  │ " + _paint("(no tokens)", _DIM, color)]
    cuts = sorted({lo, hi} | {p for p in marks if lo <= p <= hi}
                  | {p for p in range(lo, hi + 1) if (p in targets) != (p - 1 in targets)})
    pieces: list[tuple[str, str]] = []  # (text, ANSI codes)
    for a, b in zip(cuts, cuts[1:] + [hi]):
        pieces += [(m, _DIM + _CYAN) for m in marks.get(a, [])]
        if a >= hi:
            break
        text = tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text = text.replace("\r", "\\r")
        if a in targets:
            pieces.append((text, codes + _UNDER) if color else (f"⟦{text}⟧", ""))
        else:
            pieces.append((text, codes))
    bar = "  " + _paint("│", _DIM, color) + " "
    lines = [""]
    for text, paint in pieces:  # painted line by line, so that the bar of the next line is not coloured
        parts = text.split("\n")
        for k, part in enumerate(parts):
            if k:
                lines.append("")
            lines[-1] += _paint(part, paint, color) if paint else part
    return [bar + line for line in lines]
