#!/usr/bin/env bash
# verl 0.9's reward loop (verl/experimental/reward_loop: RewardLoopWorker and its reward managers, which
# load reward.custom_reward_function.* and call it once per sample) and its legacy BatchRewardManager,
# for tests/integrations/test_verl_client.py. verl is installed WITHOUT dependencies: verl 0.9.1 pins
# transformers>=5.5.3,<5.11 while this project runs on transformers 5.25 (the pins cannot share one
# environment), and its training dependencies (vllm, flash-attn, peft, wandb, datasets, hydra, ...) are
# never imported by the reward path. What that path imports at module level, and nothing more: ray core
# (no extras; the tests start no cluster), tensordict in verl's range with pyvers and cloudpickle,
# omegaconf, aiohttp, codetiming and orjson. tensordict and pyvers go in without dependencies too:
# pyvers 0.1 (required by tensordict 0.10) pins packaging<26, which would downgrade packaging for
# nothing (tensordict only uses pyvers to pick a JSON backend). Nothing here may change torch or
# transformers: a constraints file holds them, and the check at the end fails the script if either moved.
set -euo pipefail
versions() {
    python3 -c 'from importlib.metadata import version as v; print("torch==" + v("torch")); print("transformers==" + v("transformers"))'
}
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
versions > "$constraints"
python3 -m pip install -q --no-deps "verl==0.9.*"
python3 -m pip install -q --no-deps "tensordict>=0.8.0,<=0.10.0,!=0.9.0" "pyvers>=0.1.0,<0.2.0"
python3 -m pip install -q -c "$constraints" "ray>=2.41.0" "omegaconf>=2.3" "aiohttp>=3.9,<4" "codetiming" "orjson" \
    "cloudpickle"
if ! diff <(versions) "$constraints" >/dev/null; then
    echo "installing verl changed torch or transformers:"; diff <(versions) "$constraints" || true; exit 1
fi
python3 -c 'import verl; from verl.experimental.reward_loop import RewardLoopWorker; assert verl.__version__.startswith("0.9."), verl.__version__; print("verl", verl.__version__)'
