#!/usr/bin/env bash
# microvm-net-up.sh PROJECT [SSH_PORT]
#
# The spec's per-project network step (one TAP and one /30 out of
# 172.31.0.0/16, host .1, guest .2, SSH DNAT from SSH_PORT to the guest's 22),
# done by vmegress. Egress:
#   MICROVM_EGRESS_VIA_ENVOY=1  through the interception (spec 6.9 option A):
#                               no egress FORWARD/MASQUERADE is ever added
#   unset                       direct NAT egress to the uplink (FORWARD + MASQUERADE)
# Environment: VMEGRESS (binary, default vmegress), VMEGRESS_CONFIG,
# VMEGRESS_STATE_DIR, TAP_OWNER / TAP_GROUP (the jailer's uid/gid).
# Prints vmegress's description of the TAP (tap, addresses, MAC, ip= argument).
set -euo pipefail

usage() { echo "usage: $0 PROJECT [SSH_PORT]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
project=$1
ssh_port=${2:-}
vmegress=${VMEGRESS:-vmegress}

args=(net up "$project")
if [ "${MICROVM_EGRESS_VIA_ENVOY:-0}" = 1 ]; then
  args+=(--egress proxy)
else
  args+=(--egress nat)
fi
[ -n "$ssh_port" ] && args+=(--ssh-port "$ssh_port")
[ -n "${TAP_OWNER:-}" ] && args+=(--owner "$TAP_OWNER")
[ -n "${TAP_GROUP:-}" ] && args+=(--group "$TAP_GROUP")
exec "$vmegress" "${args[@]}"
