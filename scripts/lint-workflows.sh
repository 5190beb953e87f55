#!/usr/bin/env bash
# `make lint` (and the end of `make test`): checks the GitHub workflows (.github/workflows/*.yml)
# and the composite action (action.yml), which nothing here runs:
#   1. check-jsonschema against the GitHub workflow and action schemas it ships (SchemaStore's,
#      vendored in the pinned version, so no download at check time): misspelt or misplaced keys,
#      a step with both `uses` and `run`, a job without `runs-on`, an input without a description.
#   2. bash -n on every `run:` block whose shell is bash or sh (`${{ ... }}` replaced by a word).
#   3. zizmor --offline, a security audit (template injection, unpinned actions, credentials left
#      in the checkout, broad token permissions), when pip can get its wheel (manylinux x86_64/arm64).
# The tools come from PyPI (pinned below) into a venv outside the clone,
# ${XDG_CACHE_HOME:-$HOME/.cache}/uvm/tools/venv, made once with `python3 -m venv` (python3-venv,
# which `make setup` installs). actionlint is not used: its PyPI package downloads a binary from
# GitHub at install time, which the build machines cannot reach.
# Before the real files, each check must refuse a known-bad file, so that a broken tool (or an
# empty file list) cannot make this pass vacuously.
# Usage: scripts/lint-workflows.sh [FILE...]   (default: .github/workflows/*.yml action.yml)
# Exit status: 0 when every file passes; 1 with the linter's message otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "lint: $*" >&2; }
die() { echo "lint: error: $*" >&2; exit 1; }

CHECK_JSONSCHEMA=check-jsonschema==0.39.0
ZIZMOR=zizmor==1.32.0
venv=${XDG_CACHE_HOME:-$HOME/.cache}/uvm/tools/venv

# --- the tools --------------------------------------------------------------------------------
stamp=$venv/.uvm-requirements
want="$CHECK_JSONSCHEMA $ZIZMOR"
if [[ ! -x $venv/bin/check-jsonschema ]] || [[ $(cat "$stamp" 2>/dev/null) != "$want" ]] \
    || ! "$venv/bin/check-jsonschema" --version >/dev/null 2>&1; then
    command -v python3 >/dev/null || die "python3 not found: run \`make setup\` (or apt-get install python3-venv)"
    log "making the linters' venv in $venv ($want)"
    rm -rf -- "$venv"
    mkdir -p -- "$(dirname -- "$venv")"
    python3 -m venv "$venv" 2>&1 | tail -n 3 >&2 || true
    [[ -x $venv/bin/pip ]] || die "python3 -m venv $venv failed: run \`make setup\` (or apt-get install python3-venv)"
    "$venv/bin/pip" install -q --disable-pip-version-check "$CHECK_JSONSCHEMA" \
        || die "pip install $CHECK_JSONSCHEMA failed (is PyPI reachable?)"
    # zizmor is a Rust binary in a wheel; only a prebuilt one will do (no Rust toolchain here).
    if ! "$venv/bin/pip" install -q --disable-pip-version-check --only-binary=:all: "$ZIZMOR"; then
        log "note: no $ZIZMOR wheel for this platform: the zizmor audit will be skipped"
    fi
    echo "$want" >"$stamp"
fi
cj=$venv/bin/check-jsonschema
py=$venv/bin/python
zizmor=
[[ -x $venv/bin/zizmor ]] && zizmor=$venv/bin/zizmor

# --- the checks, one file at a time --------------------------------------------------------------
schema_of() {  # FILE: the builtin schema that describes it
    case $(basename -- "$1") in
    action.yml | action.yaml) echo vendor.github-actions ;;
    *) echo vendor.github-workflows ;;
    esac
}

# bash -n on each run: block. Prints one line per block that does not parse, exits 1 if any.
# ruamel.yaml comes with check-jsonschema.
check_run_blocks() {  # FILE
    "$py" - "$1" <<'EOF'
import re, subprocess, sys
from ruamel.yaml import YAML

path = sys.argv[1]
doc = YAML(typ="safe").load(open(path))
if not isinstance(doc, dict):
    sys.exit(0)  # the schema check reports it

def steps():
    runs = doc.get("runs")
    if isinstance(runs, dict):  # a composite action
        for i, s in enumerate(runs.get("steps") or []):
            yield f"runs.steps[{i}]", s, {}
    jobs = doc.get("jobs")
    for job, j in (jobs.items() if isinstance(jobs, dict) else []):
        if not isinstance(j, dict):
            continue
        default = ((j.get("defaults") or {}).get("run") or {}).get("shell") \
            or ((doc.get("defaults") or {}).get("run") or {}).get("shell")
        for i, s in enumerate(j.get("steps") or []):
            yield f"jobs.{job}.steps[{i}]", s, {"shell": default}

bad = 0
for where, step, d in steps():
    if not isinstance(step, dict) or not isinstance(step.get("run"), str):
        continue
    shell = str(step.get("shell") or d.get("shell") or "bash").split()[0]
    if shell not in ("bash", "sh"):
        continue
    # ${{ expr }} is replaced before the shell sees the text; a plain word stands in for it.
    script = re.sub(r"\$\{\{.*?\}\}", "EXPR", step["run"], flags=re.S)
    r = subprocess.run([shell, "-n"], input=script, text=True, capture_output=True)
    if r.returncode:
        name = step.get("name") or step["run"].splitlines()[0]
        print(f"{path}: {where} ({name}): {shell} -n: {r.stderr.strip()}")
        bad = 1
sys.exit(bad)
EOF
}

lint_file() {  # FILE; prints the linters' messages, returns 1 if any check fails
    local f=$1 rc=0 out
    out=$("$cj" --builtin-schema "$(schema_of "$f")" "$f" 2>&1) || { echo "$out"; rc=1; }
    out=$(check_run_blocks "$f" 2>&1) || { echo "$out"; rc=1; }
    # zizmor refuses a file the schema refuses ("no audit was performed"): nothing to add then.
    if [[ -n $zizmor && $rc == 0 ]]; then
        # --offline: no GitHub API (unreachable here); the audits that need it are left out.
        # A zizmor.yml (or .github/zizmor.yml) next to the files configures it.
        out=$("$zizmor" --offline --quiet --no-progress --color=never "$f" 2>&1) || { echo "$out"; rc=1; }
    fi
    return "$rc"
}

# --- self-check: each check must refuse a bad file ---------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf -- "$tmp"' EXIT
mkdir -p "$tmp/schema/.github/workflows" "$tmp/shell/.github/workflows" "$tmp/action" "$tmp/zizmor/.github/workflows"
cat >"$tmp/schema/.github/workflows/bad.yml" <<'EOF'
on: push
jobs:
  t:
    runs-on: ubuntu-24.04
    stepz:
      - run: echo a misspelt key
EOF
cat >"$tmp/action/action.yml" <<'EOF'
name: bad
description: an action without runs, and an input without a description
inputs:
  x:
    descripton: misspelt
EOF
cat >"$tmp/shell/.github/workflows/bad.yml" <<'EOF'
on: push
permissions: {}
jobs:
  t:
    runs-on: ubuntu-24.04
    timeout-minutes: 5
    steps:
      - run: |
          if [ -n "${{ github.sha }}" ]; then echo unterminated
EOF
cat >"$tmp/zizmor/.github/workflows/bad.yml" <<'EOF'
on: issues
permissions: {}
jobs:
  t:
    runs-on: ubuntu-24.04
    timeout-minutes: 5
    steps:
      - run: echo "${{ github.event.issue.title }}"
EOF
selfcheck() {  # WHAT FILE: the file must fail
    if lint_file "$2" >"$tmp/out" 2>&1; then
        cat "$tmp/out" >&2
        die "self-check: $1 was not refused: the linters do not work (venv: $venv)"
    fi
}
selfcheck "a workflow with a misspelt key" "$tmp/schema/.github/workflows/bad.yml"
grep -q "'stepz' was unexpected" "$tmp/out" || { cat "$tmp/out" >&2; die "self-check: the schema check did not report 'stepz'"; }
selfcheck "an action without runs" "$tmp/action/action.yml"
selfcheck "a run: block that does not parse" "$tmp/shell/.github/workflows/bad.yml"
grep -q 'bash -n' "$tmp/out" || { cat "$tmp/out" >&2; die "self-check: bash -n did not report the bad run: block"; }
if [[ -n $zizmor ]]; then
    selfcheck "a template injection" "$tmp/zizmor/.github/workflows/bad.yml"
    grep -q 'template-injection' "$tmp/out" || { cat "$tmp/out" >&2; die "self-check: zizmor did not report the template injection"; }
fi

# --- the real files ---------------------------------------------------------------------------
files=("$@")
if ((${#files[@]} == 0)); then
    shopt -s nullglob
    files=(.github/workflows/*.yml .github/workflows/*.yaml)
    shopt -u nullglob
    for f in action.yml action.yaml; do
        [[ -f $f ]] && files+=("$f")
    done
fi
((${#files[@]})) || die "no workflow files found"
failed=0
for f in "${files[@]}"; do
    [[ -f $f ]] || die "$f: no such file"
    if lint_file "$f" >"$tmp/out" 2>&1; then
        log "ok   $f"
    else
        cat "$tmp/out" >&2
        log "FAIL $f"
        failed=1
    fi
done
tools="check-jsonschema ($("$cj" --version | awk '{print $NF}')), bash -n"
[[ -n $zizmor ]] && tools+=", $("$zizmor" --version)" || tools+=" (zizmor not available: skipped)"
((failed == 0)) || die "workflow lint failed (tools: $tools)"
log "${#files[@]} files pass: $tools"
