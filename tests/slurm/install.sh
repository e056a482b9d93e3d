#!/usr/bin/env bash
# Install what the Slurm tests need (Debian packages), if missing and if we are root. Called by `make test`.
set -euo pipefail
need=()
command -v slurmctld >/dev/null || need+=(slurmctld slurmd slurm-client munge)
command -v shellcheck >/dev/null || need+=(shellcheck)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "note: ${need[*]} missing and not root: the Slurm tests will be reported as skipped" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
