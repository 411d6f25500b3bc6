#!/usr/bin/env bash
# The cluster's pieces on one machine, on 127.0.0.1: a Ray head (token auth, dashboard and
# job server), an MLflow tracking server (SQLite + S3 artifacts) and an S3 endpoint (moto).
#
#   cluster/local.sh up [--state DIR] [--num-cpus N]   # prints the variables to export
#   source .local/env.sh                               # (or the DIR given)
#   cluster/local.sh down [--state DIR]                # stops everything it started
#
# Uses the project's Python (.venv/bin/python when it exists, else python3).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
[ -x "$py" ] || py=python3
exec "$py" "$here/cluster/shan_stack.py" "$@"
