#!/bin/sh
# vmegress post-remove. deb: "remove" | "purge" | "upgrade NEW" | ...;
# rpm: 0 (erase) or 1+ (upgrade). Purge (deb) deletes the state and logs;
# /etc/vmegress is dpkg's to remove (a conffile). The group is left, as
# Debian and Fedora leave system groups.
set -e

case "$1" in
purge) rm -rf /var/lib/vmegress /var/log/vmegress /run/vmegress ;;
esac
case "$1" in
remove | purge | 0)
	if [ -d /run/systemd/system ]; then
		systemctl daemon-reload || true
	fi
	;;
esac
exit 0
