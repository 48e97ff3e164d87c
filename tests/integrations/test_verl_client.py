"""Contract tests against the real verl (verl==0.9.*): verl's own reward loop loads our reward function
from `reward.custom_reward_function.*` and calls it, and every sample's reward is exactly Scorer.score
of that (prompt, response) conversation.

verl 0.9's reward path (read in its source): `RewardLoopWorker` (verl/experimental/reward_loop/) builds
its reward manager with `load_reward_manager`, whose `get_custom_reward_fn` loads
`reward.custom_reward_function.name` from `.path` (a file path, or `pkg://module`) and binds
`.reward_kwargs`; `RewardLoopWorker.compute_score_batch` starts one asyncio task per sample, and the
"naive" manager calls the function once per sample with keywords (data_source, solution_str,
ground_truth, extra_info): awaited when it is an `async def`, otherwise in the event loop's default
thread pool. The tests drive exactly that code in-process (the worker is a plain class; verl's
RewardLoopManager would only wrap it in a ray actor), with the config taken from verl's own
`trainer/config/_generated_ppo_trainer.yaml` and changed by the README's override strings, so that a
key the config does not have (without `+`) fails as it would on verl's command line. The batch form
goes through verl's legacy `BatchRewardManager` (still shipped, no longer used by the trainer), with
the function loaded by the same `get_custom_reward_fn`.

verl is installed by .ci/clients/verl.sh WITHOUT its dependencies: verl 0.9.1 pins
transformers>=5.5.3,<5.11, which conflicts with this project's transformers 5.25 (and its training
dependencies, vllm, flash-attn, wandb, ..., are never imported by the reward path); the script adds
only the modules the reward loop imports (ray core, tensordict, omegaconf, aiohttp, codetiming,
orjson, cloudpickle). Where verl is missing those tests skip (fail under CI). The batching-queue tests
at the end need no verl.

Small sizes (the tiny random reward model, 16-24 samples): a few seconds in all on 2 CPU cores.
"""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import conversation, random_text, require_client

import themis_engine as te
import themis_engine.integrations.verl as adapter
from themis_engine.errors import InputError

CRITERIA = list(te.DEFAULT_CRITERIA)
TOL = dict(atol=1e-5, rtol=1e-5)
SYSTEM = "You judge code."
ADAPTER_FILE = str(Path(adapter.__file__).resolve())


@pytest.fixture(scope="module")
def verl():
    return require_client("verl", "bash .ci/clients/verl.sh")


@pytest.fixture(scope="module")
def scorer(tiny_rm_dir):
    return te.Scorer.from_pretrained(tiny_rm_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_rm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_rm_dir))


# ---------------------------------------------------------------------------------------------- helpers
def verl_config(verl, overrides: list[str]):
    """verl's full PPO config (the generated yaml its hydra entry point composes), with command-line
    style overrides applied as hydra does: `key=value` must name an existing key, `+key=value` a new one."""
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    OmegaConf.set_struct(cfg, True)
    for override in overrides:
        key, value = override.split("=", 1)
        value = yaml.safe_load(value)
        if key.startswith("+"):
            assert OmegaConf.select(cfg, key[1:]) is None, f"{key}: the key exists, hydra refuses '+'"
            with open_dict(cfg):
                OmegaConf.update(cfg, key[1:], value, merge=True, force_add=True)
        else:
            OmegaConf.update(cfg, key, value, merge=True)  # struct mode: an unknown key raises
    return cfg


def samples(seed: int, num_prompts: int = 4, k: int = 4):
    """K responses per prompt in an interleaved order (equal prompts not next to each other). Each
    prompt: (what extra_info["prompt"] holds, the conversation before the answer)."""
    rng = random.Random(seed)
    prompts = []
    for j in range(num_prompts):
        text = random_text(rng, 6, 14)
        if j % 3 == 0:  # plain text: the user turn
            prompts.append((text, [{"role": "user", "content": text}]))
        else:  # a message list, as parquet hands it over (a numpy array of dicts); one with a system turn
            msgs = ([{"role": "system", "content": SYSTEM}] if j % 3 == 2 else []) + [{"role": "user", "content": text}]
            prompts.append((np.array(msgs, dtype=object), msgs))
    items = [(p, random_text(rng, 2, 12)) for p in prompts for _ in range(k)]
    rng.shuffle(items)
    return [p for p, _ in items], [r for _, r in items]


def rollout_data(verl, tokenizer, prompts, responses, prompt_key: str = "prompt"):
    """A DataProto laid out as verl's rollout hands it to the reward loop: left-padded prompt ids,
    right-padded response ids ending in EOS, the attention mask over both, and the dataset's columns
    (data_source, reward_model.ground_truth, extra_info) as numpy object arrays."""
    from verl import DataProto

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pad = tokenizer.pad_token_id
    templated = [tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) for _, msgs in prompts]
    p_ids = [ids(t) for t in templated]
    r_ids = [ids(r) + [tokenizer.eos_token_id] for r in responses]
    lp, lr = max(map(len, p_ids)), max(map(len, r_ids)) + 3
    p = torch.tensor([[pad] * (lp - len(x)) + x for x in p_ids])
    pm = torch.tensor([[0] * (lp - len(x)) + [1] * len(x) for x in p_ids])
    r = torch.tensor([x + [pad] * (lr - len(x)) for x in r_ids])
    rm = torch.tensor([[1] * len(x) + [0] * (lr - len(x)) for x in r_ids])
    n = len(responses)
    return DataProto.from_dict(
        tensors={"prompts": p, "responses": r, "input_ids": torch.cat([p, r], 1),
                 "attention_mask": torch.cat([pm, rm], 1)},
        non_tensors={
            "data_source": np.array(["code"] * n, dtype=object),
            "reward_model": np.array([{"ground_truth": None, "style": "model"} for _ in range(n)], dtype=object),
            "extra_info": np.array([{prompt_key: pk, "index": i} for i, (pk, _) in enumerate(prompts)], dtype=object),
        },
    )


def expected_scores(scorer, prompts, responses) -> torch.Tensor:
    return scorer.score([msgs + [{"role": "assistant", "content": r}] for (_, msgs), r in zip(prompts, responses)])


def run_reward_loop(verl, cfg, data) -> list[dict]:
    """verl's RewardLoopWorker.compute_score_batch on `data`, on a fresh event loop (the worker is made
    inside it: verl's reward managers keep the loop current at construction)."""
    from verl.experimental.reward_loop import RewardLoopWorker

    async def main():
        return await RewardLoopWorker(cfg).compute_score_batch(data)

    return asyncio.run(main())


def queue_stats() -> dict:
    """Summed BatchQueue counters of every model the adapter module has loaded in this process."""
    total = {"requests": 0, "batches": 0}
    for sync_fn, _ in adapter._LOADED.values():
        for k in total:
            total[k] += sync_fn.queue.stats[k]
    return total


# ---------------------------------------------------------------------------------------------- verl drives it
@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
@pytest.mark.parametrize("path", ["pkg://themis_engine.integrations.verl", ADAPTER_FILE], ids=["pkg", "file"])
def test_verl_reward_loop_per_sample_matches_scorer(verl, tiny_rm_dir, scorer, tokenizer, name, path):
    prompts, responses = samples(seed=len(name) + len(path), num_prompts=4, k=4)
    n = len(responses)
    cfg = verl_config(verl, [
        f"actor_rollout_ref.model.path={tiny_rm_dir}",  # the policy's tokenizer decodes the responses
        f"reward.custom_reward_function.path={path}",
        f"reward.custom_reward_function.name={name}",
        f"+reward.custom_reward_function.reward_kwargs.model_path={tiny_rm_dir}",
        "+reward.custom_reward_function.reward_kwargs.device=cpu",
        "+reward.custom_reward_function.reward_kwargs.dtype=float32",
        "+reward.custom_reward_function.reward_kwargs.batch_wait_ms=200",  # generous: 2 busy CPU cores
        "reward.num_workers=1",  # the README's advice: one model copy, every sample in one process
    ])
    assert cfg.reward.reward_manager.name == "naive" and cfg.reward.num_workers == 1  # per-sample calls
    data = rollout_data(verl, tokenizer, prompts, responses)
    before = queue_stats()
    outputs = run_reward_loop(verl, cfg, data)
    after = queue_stats()

    assert len(outputs) == n
    got = torch.tensor([o["reward_score"] for o in outputs], dtype=torch.float32)
    expected = expected_scores(scorer, prompts, responses)
    torch.testing.assert_close(got, expected[:, 0], **TOL)
    assert all(o["reward_extra_info"] == {"acc": o["reward_score"]} for o in outputs)  # verl's float result
    # what the trainer gets: verl's own assembly puts each reward at its response's last valid token
    from verl.experimental.reward_loop.reward_manager import get_reward_manager_cls

    rm_scores = get_reward_manager_cls("naive").assemble_rm_scores(data, got.tolist())
    torch.testing.assert_close(rm_scores.sum(-1), expected[:, 0], **TOL)
    assert (rm_scores != 0).sum(-1).tolist() == [1] * n  # no sample lost its reward, none got two
    # the concurrent per-sample calls shared forward passes
    assert after["requests"] - before["requests"] == n
    assert 1 <= after["batches"] - before["batches"] < n


def test_verl_reward_loop_return_dict_criterion_and_prompt_key(verl, tiny_rm_dir, scorer, tokenizer):
    prompts, responses = samples(seed=11, num_prompts=3, k=3)
    cfg = verl_config(verl, [
        f"actor_rollout_ref.model.path={tiny_rm_dir}",
        "reward.custom_reward_function.path=pkg://themis_engine.integrations.verl",
        "reward.custom_reward_function.name=compute_score_async",
        f"+reward.custom_reward_function.reward_kwargs.model_path={tiny_rm_dir}",
        "+reward.custom_reward_function.reward_kwargs.device=cpu",
        "+reward.custom_reward_function.reward_kwargs.dtype=float32",
        "+reward.custom_reward_function.reward_kwargs.head=Memory_Efficiency",
        "+reward.custom_reward_function.reward_kwargs.return_dict=true",
        "+reward.custom_reward_function.reward_kwargs.prompt_key=question",
    ])
    outputs = run_reward_loop(verl, cfg, rollout_data(verl, tokenizer, prompts, responses, prompt_key="question"))
    expected = expected_scores(scorer, prompts, responses)
    column = CRITERIA.index("Memory_Efficiency")
    torch.testing.assert_close(torch.tensor([o["reward_score"] for o in outputs]), expected[:, column], **TOL)
    # verl logs the dict's keys; RewardLoopManager takes the key list from the first sample, so all must match
    assert all(set(o["reward_extra_info"]) == {"score", *CRITERIA} for o in outputs)
    for j, c in enumerate(CRITERIA):
        torch.testing.assert_close(torch.tensor([o["reward_extra_info"][c] for o in outputs]), expected[:, j], **TOL)


def test_verl_reward_loop_missing_prompt_names_extra_info(verl, tiny_rm_dir, tokenizer):
    prompts, responses = samples(seed=3, num_prompts=2, k=2)
    cfg = verl_config(verl, [
        f"actor_rollout_ref.model.path={tiny_rm_dir}",
        "reward.custom_reward_function.path=pkg://themis_engine.integrations.verl",
        "reward.custom_reward_function.name=compute_score",
        f"+reward.custom_reward_function.reward_kwargs.model_path={tiny_rm_dir}",
        "+reward.custom_reward_function.reward_kwargs.device=cpu",
        "+reward.custom_reward_function.reward_kwargs.dtype=float32",
    ])
    data = rollout_data(verl, tokenizer, prompts, responses, prompt_key="question")  # not under "prompt"
    with pytest.raises(InputError, match=r"extra_info has no prompt under 'prompt' \(its keys are .*'question'"):
        run_reward_loop(verl, cfg, data)


def test_verl_config_keys_need_plus_for_reward_kwargs_only(verl, tiny_rm_dir):
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cfg = verl_config(verl, ["reward.custom_reward_function.path=pkg://themis_engine.integrations.verl"])
    assert cfg.reward.custom_reward_function.name == "compute_score"  # verl's default name
    with pytest.raises((ConfigAttributeError, ConfigKeyError), match="reward_kwargs"):  # not in verl's config: '+'
        verl_config(verl, [f"reward.custom_reward_function.reward_kwargs.model_path={tiny_rm_dir}"])


def test_verl_batch_reward_manager_batch_form(verl, tiny_rm_dir, scorer, tokenizer):
    """The batch signature, through verl's legacy BatchRewardManager with the function loaded from the
    config by the reward loop's own loader (get_custom_reward_fn), by file path."""
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager import BatchRewardManager

    prompts, responses = samples(seed=5, num_prompts=3, k=3)
    cfg = verl_config(verl, [
        f"reward.custom_reward_function.path={ADAPTER_FILE}",
        "reward.custom_reward_function.name=compute_score",
        f"+reward.custom_reward_function.reward_kwargs.model_path={tiny_rm_dir}",
        "+reward.custom_reward_function.reward_kwargs.device=cpu",
        "+reward.custom_reward_function.reward_kwargs.dtype=float32",
        "+reward.custom_reward_function.reward_kwargs.head=2",
    ])
    data = rollout_data(verl, tokenizer, prompts, responses)
    manager = BatchRewardManager(tokenizer, num_examine=0, compute_score=get_custom_reward_fn(cfg))
    out = manager(data, return_dict=True)
    expected = expected_scores(scorer, prompts, responses)[:, 2]
    torch.testing.assert_close(out["reward_tensor"].sum(-1), expected, **TOL)
    assert (out["reward_tensor"] != 0).sum(-1).tolist() == [1] * len(responses)


# ---------------------------------------------------------------------------------------------- the queue (no verl)
def test_call_forms_are_told_apart(scorer):
    fn = adapter.make_compute_score(scorer)
    prompts = ["Sort a list.", "Sort a list.", "Read a file."]
    responses = ["use sorted", "a loop", "open it"]
    infos = [{"prompt": p} for p in prompts]
    expected = scorer.score([conversation(p, r) for p, r in zip(prompts, responses)])[:, 0].tolist()
    one = [fn(data_source="d", solution_str=r, ground_truth=None, extra_info=i) for r, i in zip(responses, infos)]
    assert all(isinstance(v, float) for v in one)
    for got in (
        one,
        fn(data_sources=["d"] * 3, solution_strs=responses, ground_truths=[None] * 3, extra_infos=infos),
        fn(["d"] * 3, np.array(responses, dtype=object), [None] * 3, np.array(infos, dtype=object)),  # positional
        [fn("d", r, None, i) for r, i in zip(responses, infos)],
        asyncio.run(fn.as_async(data_sources=["d"] * 3, solution_strs=responses, extra_infos=infos)),
    ):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **TOL)
    with pytest.raises(InputError, match="both solution_str"):
        fn(solution_str="x", solution_strs=["x"], extra_info=infos[0])
    with pytest.raises(InputError, match="no solution_str"):
        fn(data_source="d", extra_info=infos[0])
    with pytest.raises(InputError, match="solution_strs\\[1\\] must be a string"):
        fn(solution_strs=["a", None], extra_infos=infos[:2])
    with pytest.raises(InputError, match="non-empty list of chat messages"):
        fn(solution_str="x", extra_info={"prompt": []})
    with pytest.raises(InputError, match=r"extra_info\['prompt'\]\[0\] needs a 'role' and a 'content' string"):
        fn(solution_str="x", extra_info={"prompt": np.array([{"role": "user"}], dtype=object)})


def test_concurrent_calls_each_get_their_own_row(scorer):
    """64 threads and 64 coroutines at once, a token budget small enough for several batches: every
    caller gets the score of its own (prompt, response); equal prompts are grouped."""
    rng = random.Random(7)
    prompts = [random_text(rng, 5, 10) for _ in range(8)]
    items = [(rng.choice(prompts), random_text(rng, 1, 10)) for _ in range(64)]
    expected = scorer.score([conversation(p, r) for p, r in items])[:, 1]
    fn = adapter.make_compute_score(scorer, head=1, batch_wait_ms=50, batch_tokens=200)
    got = [None] * len(items)
    barrier = threading.Barrier(len(items))

    def call(i):
        barrier.wait()
        got[i] = fn(data_source="d", solution_str=items[i][1], ground_truth=None, extra_info={"prompt": items[i][0]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.tensor(got), expected, **TOL)
    stats = fn.queue.stats
    assert stats["requests"] == 64 and 1 < stats["batches"] < 64  # the budget split them; still shared

    async def all_async():
        return await asyncio.gather(*(fn.as_async(solution_str=r, extra_info={"prompt": p}) for p, r in items))

    torch.testing.assert_close(torch.tensor(asyncio.run(all_async())), expected, **TOL)
    assert fn.queue.stats["requests"] == 128


class _FailingScorer:
    """A stand-in whose forward pass fails (after checking it was handed the whole batch)."""

    criteria = CRITERIA
    max_tokens_per_batch = None

    def __init__(self):
        self.calls = []

    def score_groups(self, prompts, completions, system=None):
        self.calls.append(sum(len(c) for c in completions))
        raise RuntimeError("CUDA out of memory (simulated)")


def test_an_error_reaches_every_caller_of_the_batch():
    fake = _FailingScorer()
    fn = adapter.make_compute_score(fake, asynchronous=True, batch_wait_ms=200)

    async def main():
        calls = [fn(solution_str=f"r{i}", extra_info={"prompt": f"p{i % 2}"}) for i in range(6)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "simulated" in str(r) for r in results)
    assert fake.calls == [6]  # one batch, one call, every caller told
    # a bad input fails its own caller only, before it is queued
    with pytest.raises(InputError, match="extra_info has no prompt"):
        asyncio.run(fn(solution_str="x", extra_info={}))
    assert fake.calls == [6]


def test_module_function_loads_once_and_shares_the_queue_across_forms(tiny_rm_dir, scorer):
    kwargs = dict(model_path=str(tiny_rm_dir), device="cpu", dtype="float32", head=3, batch_wait_ms=1)
    first = adapter.compute_score(data_source="d", solution_str="x = 1", extra_info={"prompt": "p"}, **kwargs)
    loaded = len(adapter._LOADED)
    second = asyncio.run(adapter.compute_score_async(solution_str="x = 1", extra_info={"prompt": "p"}, **kwargs))
    assert len(adapter._LOADED) == loaded and first == second
    assert first == pytest.approx(scorer.score([conversation("p", "x = 1")])[0, 3].item(), abs=1e-5)
    with pytest.raises(InputError, match=r"needs model_path: set \+reward\.custom_reward_function"):
        asyncio.run(adapter.compute_score_async(solution_str="x", extra_info={"prompt": "p"}))
