#!/usr/bin/env bash
# microvm-net-down.sh PROJECT
#
# Removes only that project's TAP, addresses, SSH DNAT and NAT rules (spec
# 6.9: the host-wide interception stays for the other projects).
# Environment: VMEGRESS (binary, default vmegress), VMEGRESS_CONFIG, VMEGRESS_STATE_DIR.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 PROJECT" >&2; exit 2; }
exec "${VMEGRESS:-vmegress}" net down "$1"
