#!/bin/sh
# vmegress pre-remove. deb: "remove" | "upgrade NEW" | ...; rpm: 0 (erase) or
# 1+ (upgrade). On an upgrade nothing is stopped (the new package's
# post-install restarts the daemon). On removal: stop and disable the daemon,
# then remove the interception (`vmegress down`), so no rule outlives the
# program that owns it.
set -e

case "$1" in
remove | 0) ;;
*) exit 0 ;;
esac

if [ -d /run/systemd/system ]; then
	systemctl --no-reload disable --now vmegress.service >/dev/null 2>&1 || true
fi
if [ -x /usr/bin/vmegress ]; then
	/usr/bin/vmegress down ||
		echo "vmegress: 'vmegress down' failed; remove the vmegress nft table and ip rule by hand" >&2
fi
exit 0
