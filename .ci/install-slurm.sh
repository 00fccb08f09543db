#!/usr/bin/env bash
# Install Debian's Slurm (slurmctld, slurmd, client) and munge for the one-node Slurm tests. Idempotent: does nothing
# when they are installed. The tests start their own daemons with a private slurm.conf; nothing here starts a service.
set -euo pipefail
missing=()
for package in slurmctld slurmd slurm-client munge; do
    dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
