#!/usr/bin/env bash
# TRL, whose GRPOTrainer the contract tests drive (tests/integrations/test_trl_client.py). Installed
# with its dependencies (accelerate, datasets, pandas, ...), under a constraints file that holds torch
# and transformers at the versions already installed: TRL 1.16 accepts them (torch >= 2.6 through
# accelerate, transformers >= 4.56.2), and no resolver choice may replace the CPU torch wheel or move
# transformers. The check at the end fails the script if either changed anyway.
set -euo pipefail
versions() {
    python3 -c 'from importlib.metadata import version as v; print("torch==" + v("torch")); print("transformers==" + v("transformers"))'
}
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
versions > "$constraints"
python3 -m pip install -q -c "$constraints" "trl==1.16.*"
if ! diff <(versions) "$constraints" >/dev/null; then
    echo "installing trl changed torch or transformers:"; diff <(versions) "$constraints" || true; exit 1
fi
python3 -c 'import trl; assert trl.__version__.startswith("1.16."), trl.__version__; print("trl", trl.__version__)'
