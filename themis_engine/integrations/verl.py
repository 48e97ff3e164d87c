"""verl: a batch `compute_score` for verl's BatchRewardManager (`reward_model.reward_manager=batch`).

verl calls `compute_score(data_sources=..., solution_strs=..., ground_truths=..., extra_infos=...,
**reward_kwargs)` with the decoded responses of the whole batch and expects one result per
response: a float, or a dict with "score" (the reward) whose other keys verl logs. A reward model
needs the prompt, which verl does not pass by itself: put it in each row's `extra_info` when you
build the dataset (`extra_info["prompt"] = <the user text or the message list>`). ground_truths
and data_sources are not used.

Two ways to plug it in:

    # your own file, named in custom_reward_function.path (name=compute_score)
    from themis_engine import Scorer
    from themis_engine.integrations.verl import make_compute_score
    compute_score = make_compute_score(Scorer.from_pretrained("path/to/rm"), return_dict=True)

    # or this file itself, configured from verl's config:
    #   custom_reward_function.path=<site-packages>/themis_engine/integrations/verl.py
    #   custom_reward_function.name=compute_score
    #   +custom_reward_function.reward_kwargs.model_path=path/to/rm

verl imports such a file by path, so this module uses absolute imports only.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable

from themis_engine.errors import InputError
from themis_engine.integrations import criterion_index, score_prompt_runs

if TYPE_CHECKING:  # the adapters take a Scorer; they import it for typing only (see integrations/__init__)
    from themis_engine.scoring.scorer import Scorer

__all__ = ["make_compute_score", "compute_score"]


def make_compute_score(
    scorer: Scorer,
    prompt_key: str = "prompt",
    head: int | str = 0,
    return_dict: bool = False,
    system: str | None = None,
) -> Callable[..., list]:
    """A verl batch compute_score backed by `scorer`.

    prompt_key: the key of extra_infos[i] that holds the prompt (a str = the user turn, or a list
    of chat messages). head: the criterion (name or index) whose score is the reward.
    return_dict: return {"score": reward, <criterion>: score, ...} per response instead of floats.
    system: a system message for every prompt that has none of its own.
    Consecutive equal prompts (verl's rollout.n samples of one prompt) share their prefix."""
    criteria = scorer.criteria
    column = criterion_index(criteria, head)

    def compute_score(data_sources, solution_strs, ground_truths=None, extra_infos=None, **kwargs) -> list:
        responses = list(solution_strs)
        infos = [None] * len(responses) if extra_infos is None else list(extra_infos)
        if len(infos) != len(responses):
            raise InputError(f"verl compute_score: {len(responses)} solution_strs but {len(infos)} extra_infos")
        prompts = [_prompt_of(info, prompt_key, i) for i, info in enumerate(infos)]
        scores = score_prompt_runs(scorer, prompts, responses, system=system)  # [N, H]
        rewards = scores[:, column].tolist()
        if not return_dict:
            return rewards
        per_criterion = {name: scores[:, j].tolist() for j, name in enumerate(criteria)}
        return [
            {"score": rewards[i], **{name: values[i] for name, values in per_criterion.items()}}
            for i in range(len(rewards))
        ]

    compute_score.criteria = list(criteria)
    return compute_score


def _prompt_of(info: Any, key: str, i: int):
    """extra_infos[i][key] as a str or a list of message dicts (verl hands parquet list columns
    over as numpy arrays)."""
    if not hasattr(info, "get") or info.get(key) is None:
        have = f"its keys are {sorted(map(str, info))}" if hasattr(info, "keys") else f"it is {type(info).__name__}"
        raise InputError(
            f"verl compute_score: extra_infos[{i}] has no prompt under {key!r} ({have}); put the prompt in "
            f"the dataset's extra_info[{key!r}]"
        )
    prompt = info[key]
    if isinstance(prompt, str):
        return prompt
    if hasattr(prompt, "__len__") and all(hasattr(m, "keys") for m in prompt):
        return [dict(m) for m in prompt]
    raise InputError(
        f"verl compute_score: extra_infos[{i}][{key!r}] must be a string or a list of chat messages, "
        f"got {type(prompt).__name__}"
    )


# ------------------------------------------------------------------------------ configured from verl
_LOADED: dict[tuple, Callable[..., list]] = {}
_LOAD_LOCK = threading.Lock()


def compute_score(
    data_sources,
    solution_strs,
    ground_truths=None,
    extra_infos=None,
    model_path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_length: int = 4096,
    max_tokens_per_batch: int | None = None,
    prompt_key: str = "prompt",
    head: int | str = 0,
    return_dict: bool = False,
    system: str | None = None,
    **kwargs,
) -> list:
    """verl's batch compute_score with the reward model named by `model_path` (from
    custom_reward_function.reward_kwargs); the scorer is loaded on first use and kept per process."""
    if model_path is None:
        raise InputError(
            "themis_engine.integrations.verl.compute_score needs model_path: set "
            "+custom_reward_function.reward_kwargs.model_path=<reward model folder>"
        )
    key = (str(model_path), device, dtype, int(max_length), max_tokens_per_batch, prompt_key, str(head),
           bool(return_dict), system)
    with _LOAD_LOCK:
        fn = _LOADED.get(key)
        if fn is None:
            import torch

            from themis_engine.scoring.scorer import Scorer

            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            scorer = Scorer.from_pretrained(
                model_path, device=device, dtype=torch_dtype, max_length=max_length,
                max_tokens_per_batch=max_tokens_per_batch,
            )
            fn = _LOADED[key] = make_compute_score(
                scorer, prompt_key=prompt_key, head=head, return_dict=return_dict, system=system
            )
    return fn(data_sources, solution_strs, ground_truths, extra_infos)
