#!/usr/bin/env bash
# LLaMA-Factory 0.9.5 in its own virtualenv, for the `llamafactory` row of bench/bench_train.py.
#
#     bash bench/setup_llamafactory.sh        (in the environment you installed this project into; ~1 minute)
#
# LLaMA-Factory pins its own transformers (<= 5.6), peft (<= 0.18.1), accelerate and trl, so it cannot share our
# environment. It does share our torch: a .pth file puts the project's site-packages after the new venv's own,
# so pip sees torch already installed (no second multi-GB download) while LLaMA-Factory's pinned packages,
# installed into the new venv, take precedence. PYTHON picks the project's interpreter (default: python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch" 2>/dev/null || { echo "$PY cannot import torch: install this project first (README)" >&2; exit 1; }
VENV=bench/.venv-llamafactory
"$PY" -m venv "$VENV"
SITE=$("$PY" -c "import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)")
OWN=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
echo "$(cd "$SITE" && pwd)" > "$OWN/zz_project_torch.pth"
# kernels: its transformers 5.6 imports `kernels` when it is importable and needs 0.12.x; without a copy here it
# would find the newer one the project's transformers pulls in, through the .pth above, and fail at import.
"$VENV/bin/pip" install -q "llamafactory==0.9.5" "kernels>=0.12,<0.13"
"$VENV/bin/python" -c "import llamafactory, transformers, torch; print('LLaMA-Factory', llamafactory.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
