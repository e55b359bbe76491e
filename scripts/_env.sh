# Shared set-up for scripts/run, scripts/test and scripts/bench (sourced, not run).
# Finds a Python >= 3.12, creates .venv and installs the pinned dependencies when the lock
# file changed since the last install.
set -euo pipefail
LLMITM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LLMITM_ROOT

find_python() {
  local candidates=()
  [ -n "${LLMITM_PYTHON:-}" ] && candidates+=("$LLMITM_PYTHON")
  candidates+=(python3.14 python3.13 python3.12)
  local p
  # Newest first: the lock file is resolved on 3.13 (3.12.1 needs older typing-extensions).
  while IFS= read -r p; do
    [ -x "$p" ] && candidates+=("$p")
  done < <(ls -d /root/.pyenv/versions/3.1[2-9]*/bin/python3 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 \
             /usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9] 2>/dev/null | sort -rV -u)
  candidates+=(python3)
  for p in "${candidates[@]}"; do
    if command -v "$p" >/dev/null 2>&1 &&
       "$p" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      command -v "$p"
      return 0
    fi
  done
  return 1
}

ensure_venv() {
  local venv="$LLMITM_ROOT/.venv" stamp="$LLMITM_ROOT/.venv/.llmitm-lock.sha256" py want
  if [ ! -x "$venv/bin/python" ]; then
    if ! py="$(find_python)"; then
      echo "llmitm: no Python >= 3.12 with venv found. Install python3.12 (or newer) and python3-venv," >&2
      echo "        or point LLMITM_PYTHON at one (e.g. LLMITM_PYTHON=/opt/python3.13/bin/python3)." >&2
      exit 1
    fi
    echo "llmitm: creating .venv with $py" >&2
    "$py" -m venv "$venv"
  fi
  want="$(sha256sum "$LLMITM_ROOT/requirements.lock" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "llmitm: installing pinned dependencies (requirements.lock)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$LLMITM_ROOT/requirements.lock"
    echo "$want" > "$stamp"
  fi
  export PATH="$venv/bin:$PATH"
}
