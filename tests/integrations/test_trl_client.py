"""Contract tests against the real TRL (trl==1.16.*): its GRPOTrainer trains with our reward
functions and gets, for every (prompt, completion) it sampled, exactly Scorer.score of that
conversation; and the functions survive what TRL's async GRPO trainer does with them (stdlib
`pickle.dumps` of the list, a "spawn" child process that hides the GPUs after unpickling, the
functions called concurrently from threads).

TRL is installed by .ci/clients/trl.sh with its own dependencies (accelerate, datasets, pandas, ...)
under a constraints file that holds torch and transformers at the versions already installed: TRL
1.16 accepts them (torch >= 2.6 via accelerate, transformers >= 4.56.2), and the CPU torch wheel
(2.13.0+cpu) and transformers (5.25.0) must not be replaced by a resolver's choice. Unlike
OpenRLHF and verl, no --no-deps is needed. Where TRL is missing the tests skip (fail under CI).

Small sizes throughout (a tiny random Qwen3 policy, 2 steps, 2 generations of 8 tokens): each test
takes seconds on 2 CPU cores; the spawned-process test pays for importing torch in the child.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import pickle
import traceback
import types

import pytest
import torch
from helpers import conversation, require_client

import themis_engine as te
from themis_engine.integrations.trl import CriterionReward
from themis_engine.testing.tiny import build_checkpoint

CRITERIA = list(te.DEFAULT_CRITERIA)
TOL = dict(atol=1e-5, rtol=1e-5)
PROMPTS = ["Write a function that sums a list.", "Sort a list in place.", "Read a file safely.", "Reverse a string."]


@pytest.fixture(scope="module")
def trl():
    return require_client("trl", "bash .ci/clients/trl.sh")


@pytest.fixture(scope="module")
def scorer(tiny_rm_dir):
    return te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def policy_dir(tiny_rm_dir, tmp_path_factory):
    """A tiny random Qwen3ForCausalLM with the reward model's tokenizer (ChatML template)."""
    return build_checkpoint(tmp_path_factory.mktemp("policy") / "policy", head="causal", family="qwen3",
                            tokenizer_dir=tiny_rm_dir, seed=1)


def _conversations(prompts, completions) -> list[list[dict]]:
    """What TRL passed, as the conversations Scorer.score takes (plain text: the prompt is the user turn)."""
    out = []
    for p, c in zip(prompts, completions):
        if isinstance(p, str):
            out.append(conversation(p, c))
        else:
            out.append(list(p) + list(c))
    return out


def _batch(n_prompts: int = 3, k: int = 2):
    """GRPO's layout: each prompt k times in a row, one completion each."""
    prompts = [p for p in PROMPTS[:n_prompts] for _ in range(k)]
    completions = [f"def f(xs): return sorted(xs)[{i}]" for i in range(len(prompts))]
    return prompts, completions


# ------------------------------------------------------------------ the real GRPOTrainer


@pytest.mark.parametrize("fmt", ["conversational", "plain"])
def test_grpo_trainer_rewards_equal_scorer(trl, scorer, tiny_rm_dir, policy_dir, tmp_path, monkeypatch, fmt):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if fmt == "conversational":
        prompts = [[{"role": "system", "content": "Write Python."}, {"role": "user", "content": p}] for p in PROMPTS]
    else:
        prompts = list(PROMPTS)
    dataset = datasets.Dataset.from_dict({"prompt": prompts, "language": ["python"] * len(prompts)})

    calls = []  # what TRL passes to each of our functions, and what they return
    call = CriterionReward.__call__

    def recording_call(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        calls.append((self.__name__, args, kwargs, out))
        return out

    monkeypatch.setattr(CriterionReward, "__call__", recording_call)

    funcs = scorer.as_trl_reward_funcs()
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, num_generations=2,
        max_completion_length=8, max_steps=2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32),
        reward_funcs=funcs, args=args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(str(tiny_rm_dir)),
    )
    assert trainer.reward_func_names == CRITERIA

    received = []  # the rewards TRL assembled from our functions: [N, number of functions] per batch
    calculate = trainer._calculate_rewards

    def spy(inputs, batch_prompts, batch_completions, completion_ids):
        rewards = calculate(inputs, batch_prompts, batch_completions, completion_ids)
        received.append((batch_prompts, batch_completions, rewards.detach().cpu().clone()))
        return rewards

    trainer._calculate_rewards = spy
    trainer.train()

    assert len(received) == 2  # one generation batch per step
    for batch_prompts, batch_completions, rewards in received:
        assert rewards.shape == (2, len(CRITERIA))
        if fmt == "plain":
            assert all(isinstance(p, str) for p in batch_prompts) and all(isinstance(c, str) for c in batch_completions)
        else:
            assert all(c[-1]["role"] == "assistant" and len(c) == 1 for c in batch_completions)
        expected = scorer.score(_conversations(batch_prompts, batch_completions))
        torch.testing.assert_close(rewards, expected, **TOL)

    # every function was called by keyword, once per batch, with TRL's extra columns; it returned floats
    assert [name for name, *_ in calls] == CRITERIA * 2
    for i, (name, pos, kw, out) in enumerate(calls):
        assert pos == () and {"prompts", "completions", "completion_ids", "trainer_state", "language"} <= set(kw)
        assert isinstance(out, list) and len(out) == 2 and all(isinstance(v, float) for v in out)
        expected = scorer.score(_conversations(kw["prompts"], kw["completions"]))[:, CRITERIA.index(name)]
        torch.testing.assert_close(torch.tensor(out), expected, **TOL)
        torch.testing.assert_close(torch.tensor(out), received[i // len(CRITERIA)][2][:, CRITERIA.index(name)])
    # one forward pass per batch for all five criteria; TRL logs each under its name
    assert funcs[0].cache.forward_batches == 2 and funcs[0].cache.lookups == 2 * len(CRITERIA)
    logged = set().union(*(entry.keys() for entry in trainer.state.log_history))
    assert {f"rewards/{name}/mean" for name in CRITERIA} <= logged


# ------------------------------------------------------------------ pickling (TRL's async GRPO)


def test_reward_functions_pickle_and_score_the_same(scorer):
    prompts, completions = _batch()
    funcs = scorer.as_trl_reward_funcs(criteria=["Security_Hardness", 0], system="Review the code.")
    expected = [f(prompts=prompts, completions=completions) for f in funcs]

    blob = pickle.dumps({"reward_funcs": funcs})  # what AsyncRolloutWorker.start() checks, stdlib pickle
    back = pickle.loads(blob)["reward_funcs"]
    assert [f.__name__ for f in back] == ["Security_Hardness", CRITERIA[0]]
    assert [f.column for f in back] == [4, 0]
    assert back[0].cache is back[1].cache
    assert [f(prompts=prompts, completions=completions) for f in back] == expected

    one_by_one = [pickle.loads(pickle.dumps(f)) for f in funcs]  # pickled separately: still one cache
    assert one_by_one[0].cache is one_by_one[1].cache
    assert [f(prompts=list(prompts), completions=list(completions)) for f in one_by_one] == expected


def test_from_pretrained_scorer_pickles_as_its_recipe(scorer):
    assert getattr(scorer, "load_kwargs", None), "Scorer.from_pretrained must record scorer.load_kwargs"
    funcs = scorer.as_trl_reward_funcs()
    blob = pickle.dumps(funcs)
    whole = pickle.dumps(scorer)
    assert len(blob) < 16_384 < len(whole)  # the recipe, not the weights
    back = pickle.loads(blob)
    assert back[0].scorer is scorer  # unpickled in the loading process: the same scorer, not a second copy


def test_scorer_not_from_pretrained_pickles_whole(scorer):
    bare = te.Scorer(scorer.model, scorer.tokenizer, max_length=scorer.max_length)
    prompts, completions = _batch(2, 3)
    funcs = bare.as_trl_reward_funcs()
    expected = [f(prompts=prompts, completions=completions) for f in funcs]
    blob = pickle.dumps(funcs)
    assert len(blob) > len(pickle.dumps(scorer.model.state_dict()))  # the weights travel
    del funcs
    gc.collect()  # the functions' cache is gone from this process: unpickling makes a new one
    back = pickle.loads(blob)
    assert back[0].scorer is not bare and all(f.scorer is back[0].scorer for f in back)
    assert back[0].cache.forward_batches == 0
    assert [g(prompts=prompts, completions=completions) for g in back] == expected
    assert back[0].cache.forward_batches == 1


def test_gpu_scorer_not_from_pretrained_is_a_clear_error():
    # a scorer built by hand whose model sits on a GPU: pickled whole, a CUDA-free child could not load it
    fake = types.SimpleNamespace(criteria=CRITERIA, model=types.SimpleNamespace(device=torch.device("cuda", 0)))
    funcs = te.integrations.trl.reward_funcs(fake)
    with pytest.raises(TypeError, match=r"model is on cuda:0.*Scorer\.from_pretrained\(path"):
        pickle.dumps(funcs)


def _async_worker_child(reward_funcs, prompts, completions, out) -> None:
    """What TRL's async GRPO rollout child does: its arguments are unpickled first, then it hides the
    GPUs, then it calls every reward function at once, each in a thread (asyncio.to_thread)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        async def score_group():
            return await asyncio.gather(*[
                asyncio.to_thread(f, prompts=prompts, completions=completions, completion_ids=None)
                for f in reward_funcs
            ])

        rewards = asyncio.run(score_group())
        cache, scorer = reward_funcs[0].cache, reward_funcs[0].scorer
        out.put({
            "rewards": rewards,
            "names": [f.__name__ for f in reward_funcs],
            "one_cache": all(f.cache is cache for f in reward_funcs),
            "forward_batches": cache.forward_batches,
            "device": str(scorer.model.device),
            "max_length": scorer.max_length,
        })
    except BaseException:
        out.put({"error": traceback.format_exc()})


def test_spawned_child_loads_the_recipe_and_scores_the_same(tiny_rm_dir):
    scorer = te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32)
    assert getattr(scorer, "load_kwargs", None), "Scorer.from_pretrained must record scorer.load_kwargs"
    scorer.max_length = 300  # a setting changed after loading travels with the recipe
    if not torch.cuda.is_available():  # as if loaded on a GPU: the CUDA-free child must load it on the CPU
        scorer.load_kwargs = dict(scorer.load_kwargs, device="cuda")
    funcs = scorer.as_trl_reward_funcs()
    prompts, completions = _batch()
    pickle.dumps({"reward_funcs": funcs})  # TRL's check before it spawns

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_async_worker_child, args=(funcs, prompts, completions, out), daemon=True)
    child.start()
    try:
        result = out.get(timeout=240)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    assert "error" not in result, result.get("error")
    assert result["names"] == CRITERIA and result["one_cache"]
    assert result["forward_batches"] == 1  # five concurrent calls, one forward pass
    assert result["device"] == "cpu" and result["max_length"] == 300
    expected = scorer.score(_conversations(prompts, completions))
    torch.testing.assert_close(torch.tensor(result["rewards"]).T, expected, **TOL)
