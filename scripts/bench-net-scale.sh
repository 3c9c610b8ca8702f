#!/usr/bin/env bash
# Measures `vmegress net up` / `net down` latency with 0, 1,000 and 4,000
# projects already up (real TAPs in a throwaway network namespace), and the
# daemon's resident memory holding them. Needs root. Method: each iteration
# runs the real CLI (process start, state lock and atomic write, TAP via
# netlink, ruleset element update) for one extra project and takes it down
# again; the figures are means over the iterations. Compare ratios, not
# absolute numbers: the machines are shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${1:-20}
VMEGRESS_E2E=1 go test -run '^$' -bench '^BenchmarkNetScale$' -benchtime "${iterations}x" -count 1 ./e2e/
