#!/usr/bin/env bash
# LLaMA-Factory 0.9.5 in its own virtualenv, for the `llamafactory` row of bench/bench_train.py.
#
#     bash bench/setup_llamafactory.sh        (after the project's own .venv exists; ~2 minutes, ~600 MB)
#
# LLaMA-Factory pins its own transformers (<= 5.6), peft (<= 0.18.1), accelerate and trl, so it cannot share our
# environment. It does share our torch: a .pth file puts the project's site-packages after the new venv's own,
# so pip sees torch already installed (no second multi-GB download) while LLaMA-Factory's pinned packages,
# installed into the new venv, take precedence.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=${MAIN_VENV:-.venv}
[ -x "$MAIN/bin/python" ] || { echo "no $MAIN: create the project's virtualenv first (see README)" >&2; exit 1; }
VENV=bench/.venv-llamafactory
python3 -m venv "$VENV"
SITE=$("$MAIN/bin/python" -c "import site; print(site.getsitepackages()[0])")
OWN=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
echo "$(cd "$SITE" && pwd)" > "$OWN/zz_project_torch.pth"
"$VENV/bin/pip" install -q "llamafactory==0.9.5"
"$VENV/bin/python" -c "import llamafactory, transformers, torch; print('LLaMA-Factory', llamafactory.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
