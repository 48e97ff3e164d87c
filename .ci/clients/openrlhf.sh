#!/usr/bin/env bash
# OpenRLHF 0.11's own remote reward client (openrlhf/utils/agent.py: SingleTurnAgentExecutor, the code
# its vLLM rollout actors run to POST /get_reward), for tests/integrations/test_openrlhf_client.py.
# Installed without dependencies: openrlhf 0.11.2 pins transformers==5.15.0 and verl 0.9.1 pins
# transformers>=5.5.3,<5.11 while this project runs on transformers 5.25 (the pins cannot share one
# environment), and openrlhf's training dependencies (deepspeed, flash-attn, ray, vllm) are never
# imported by the reward client. What `import openrlhf.utils.agent` needs at module level: aiohttp (the
# HTTP client) and, through openrlhf/utils/__init__.py, torch and transformers (already installed),
# sympy (a torch dependency) and pylatexenc (math_utils). Nothing here may change torch or transformers.
# Note: the openrlhf wheel also installs a top-level `tests` package into site-packages; this project
# never imports a `tests` package (pytest.ini puts tests/ itself on sys.path), so it does no harm.
set -euo pipefail
python3 -m pip install -q --no-deps "openrlhf==0.11.*"
python3 -m pip install -q "aiohttp>=3.9,<4" "pylatexenc==2.11" "sympy>=1.13"
