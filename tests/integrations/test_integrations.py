"""TRL and verl adapters, called the way their trainers call them, against Scorer.score on the same texts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from helpers import conversation, random_text

import themis_engine as te
from themis_engine.integrations import prompt_runs
from themis_engine.integrations.trl import reward_funcs
from themis_engine.integrations.verl import compute_score as verl_compute_score
from themis_engine.integrations.verl import make_compute_score
from themis_engine.scoring.scorer import InputError

CRITERIA = list(te.DEFAULT_CRITERIA)
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 on the CPU; packed vs alone differ only by summation order


@pytest.fixture(scope="module")
def ckpt(tiny_rm_dir):
    return tiny_rm_dir


@pytest.fixture(scope="module")
def scorer(ckpt):
    return te.Scorer.from_pretrained(ckpt, device="cpu", dtype=torch.float32)


def grpo_batch(seed: int, num_prompts: int = 4, num_generations: int = 3):
    """Prompts repeated num_generations times in a row (GRPO's layout), one completion each."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(num_prompts):
        p = random_text(rng, 8, 20)
        for _ in range(num_generations):
            prompts.append(p)
            completions.append(random_text(rng, 2, 12))
    return prompts, completions


class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def remove(self):
        self._handle.remove()


def test_trl_plain_text_keyword_call_matches_scorer(scorer):
    prompts, completions = grpo_batch(0)
    funcs = scorer.as_trl_reward_funcs()
    assert [f.__name__ for f in funcs] == CRITERIA
    expected = scorer.score([conversation(p, c) for p, c in zip(prompts, completions)])
    for j, f in enumerate(funcs):
        # TRL: reward_func(prompts=..., completions=..., completion_ids=..., **dataset columns)
        out = f(
            prompts=prompts, completions=completions, completion_ids=[[1, 2, 3]] * len(prompts),
            trainer_state=None, language=["python"] * len(prompts), ground_truth=[None] * len(prompts),
        )
        assert isinstance(out, list) and len(out) == len(prompts) and all(isinstance(v, float) for v in out)
        torch.testing.assert_close(torch.tensor(out), expected[:, j], **TOL)


def test_trl_conversational_matches_scorer(scorer):
    prompts, completions = grpo_batch(1, num_prompts=3, num_generations=2)
    system = "Review the code."
    conv_prompts = [[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in prompts]
    conv_completions = [[{"role": "assistant", "content": c}] for c in completions]
    funcs = reward_funcs(scorer, criteria=["Security_Hardness", 1])
    assert [f.__name__ for f in funcs] == ["Security_Hardness", "Runtime_Efficiency"]
    expected = scorer.score([conversation(p, c, system) for p, c in zip(prompts, completions)])
    sec = funcs[0](conv_prompts, conv_completions, answer=["x"] * len(prompts))
    run = funcs[1](prompts=conv_prompts, completions=conv_completions)
    torch.testing.assert_close(torch.tensor(sec), expected[:, 4], **TOL)
    torch.testing.assert_close(torch.tensor(run), expected[:, 1], **TOL)


def test_trl_system_option_only_where_the_prompt_has_none(scorer):
    prompts, completions = grpo_batch(2, num_prompts=2, num_generations=2)
    own = [{"role": "system", "content": "own"}, {"role": "user", "content": prompts[0]}]
    mixed_prompts = [prompts[0], prompts[1], own, own]
    (f,) = reward_funcs(scorer, criteria=[0], system="shared")
    out = f(prompts=mixed_prompts, completions=completions)
    expected = scorer.score([
        conversation(prompts[0], completions[0], "shared"),
        conversation(prompts[1], completions[1], "shared"),
        conversation(prompts[0], completions[2], "own"),
        conversation(prompts[0], completions[3], "own"),
    ])
    torch.testing.assert_close(torch.tensor(out), expected[:, 0], **TOL)


def test_one_forward_pass_serves_every_criterion(scorer):
    prompts, completions = grpo_batch(3)
    funcs = scorer.as_trl_reward_funcs()
    counter = ForwardCounter(scorer.model)
    try:
        for f in funcs:
            f(prompts=list(prompts), completions=list(completions))  # new list objects: keyed by content
        assert counter.calls == 1
        assert funcs[0].cache.forward_batches == 1 and funcs[0].cache.lookups == len(CRITERIA)
        other_prompts, other_completions = grpo_batch(4)
        for f in funcs:
            f(prompts=other_prompts, completions=other_completions)
        assert counter.calls == 2
    finally:
        counter.remove()


def test_repeated_prompts_share_their_prefix(scorer):
    prompts, completions = grpo_batch(5, num_prompts=3, num_generations=4)
    (f,) = scorer.as_trl_reward_funcs(criteria=[0])
    f(prompts=prompts, completions=completions)
    report = scorer.last_report
    # the tokens the prefix-shared groups need: each group's common prefix once
    tok = scorer.tokenizer
    ids = [tok(tok.apply_chat_template(conversation(p, c), tokenize=False), add_special_tokens=False)["input_ids"]
           for p, c in zip(prompts, completions)]
    expected = 0
    for a, b in prompt_runs(prompts):
        group = ids[a:b]
        lcp = 0
        while all(len(s) > lcp + 1 and s[lcp] == group[0][lcp] for s in group):
            lcp += 1
        expected += lcp + sum(len(s) - lcp for s in group)
    assert report.sequences == len(prompts)
    assert report.tokens_standalone == sum(map(len, ids))
    assert report.tokens_computed == expected < report.tokens_standalone


def test_trl_multi_message_completion_scores_the_whole_conversation(scorer):
    prompt = [{"role": "user", "content": "sum a list"}]
    tool_call = [
        {"role": "assistant", "content": "calling a tool"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "def f(xs): return sum(xs)"},
    ]
    simple = [{"role": "assistant", "content": "return sum(xs)"}]
    (f,) = reward_funcs(scorer, criteria=[2])
    out = f(prompts=[prompt, prompt], completions=[tool_call, simple])
    expected = scorer.score([prompt + tool_call, prompt + simple])
    torch.testing.assert_close(torch.tensor(out), expected[:, 2], **TOL)


def test_trl_bad_input_is_a_clear_error(scorer):
    (f,) = reward_funcs(scorer, criteria=[0])
    with pytest.raises(InputError, match="2 prompts but 1 completions"):
        f(prompts=["a", "b"], completions=["x"])
    with pytest.raises(InputError, match="completion 1: the last message must be the assistant's answer"):
        f(prompts=["a", "b"], completions=["x", [{"role": "user", "content": "y"}]])
    with pytest.raises(ValueError, match="unknown criterion 'Speed'"):
        reward_funcs(scorer, criteria=["Speed"])
    with pytest.raises(ValueError, match="out of range"):
        reward_funcs(scorer, criteria=[5])


def test_verl_batch_call_matches_scorer(scorer):
    prompts, completions = grpo_batch(6, num_prompts=3, num_generations=2)
    n = len(prompts)
    # verl hands the non-tensor batch over as numpy object arrays; a list prompt is an array of dicts
    extra_infos = np.array(
        [{"prompt": p, "index": i} if i % 2 else {"question": p, "index": i} for i, p in enumerate(prompts)],
        dtype=object,
    )
    for i in range(0, n, 2):
        extra_infos[i]["question"] = np.array([{"role": "user", "content": prompts[i]}], dtype=object)
    expected = scorer.score([conversation(p, c) for p, c in zip(prompts, completions)])

    kwargs = dict(
        data_sources=np.array(["code"] * n, dtype=object), solution_strs=completions,
        ground_truths=[None] * n, extra_infos=extra_infos,
    )
    fn = make_compute_score(scorer, prompt_key="question", head="Memory_Efficiency")
    with pytest.raises(InputError, match=r"extra_infos\[1\] has no prompt under 'question'"):
        fn(**kwargs)
    for i in range(1, n, 2):
        extra_infos[i]["question"] = prompts[i]
    out = fn(**kwargs, some_reward_kwarg=1)
    assert isinstance(out, list) and all(isinstance(v, float) for v in out)
    torch.testing.assert_close(torch.tensor(out), expected[:, 2], **TOL)

    dicts = make_compute_score(scorer, prompt_key="question", return_dict=True)(**kwargs)
    assert set(dicts[0]) == {"score", *CRITERIA}
    torch.testing.assert_close(torch.tensor([d["score"] for d in dicts]), expected[:, 0], **TOL)
    for j, name in enumerate(CRITERIA):
        torch.testing.assert_close(torch.tensor([d[name] for d in dicts]), expected[:, j], **TOL)


def test_verl_missing_extra_info_names_the_index(scorer):
    fn = make_compute_score(scorer)
    with pytest.raises(InputError, match=r"extra_infos\[1\] has no prompt under 'prompt' \(it is NoneType\)"):
        fn(["d", "d"], ["x", "y"], [None, None], [{"prompt": "p"}, None])


def test_verl_module_function_loads_the_model_from_reward_kwargs(ckpt, scorer):
    prompts, completions = grpo_batch(7, num_prompts=2, num_generations=2)
    out = verl_compute_score(
        data_sources=["code"] * len(prompts), solution_strs=completions, ground_truths=[None] * len(prompts),
        extra_infos=[{"prompt": p} for p in prompts], model_path=str(ckpt), device="cpu", dtype="float32",
        head=3,
    )
    expected = scorer.score([conversation(p, c) for p, c in zip(prompts, completions)])
    torch.testing.assert_close(torch.tensor(out), expected[:, 3], **TOL)
    with pytest.raises(InputError, match="needs model_path"):
        verl_compute_score(["d"], ["x"], [None], [{"prompt": "p"}])
