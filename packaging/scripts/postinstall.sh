#!/bin/sh
# vmegress post-install. deb: "configure [OLD-VERSION]"; rpm: 1 (install) or
# 2+ (upgrade). Enables and starts nothing on a fresh install; an upgrade
# restarts a running daemon (try-restart: a stopped one stays stopped). The
# interception stays installed while the daemon restarts, so guests stay
# fail-closed in the gap.
set -e

upgrade=
case "$1" in
configure) if [ -n "$2" ]; then upgrade=1; fi ;;
[0-9]*) if [ "$1" -ge 2 ]; then upgrade=1; fi ;;
*) exit 0 ;; # abort-upgrade, abort-remove, ...: nothing to redo
esac

# The API socket's group (api_group): sysusers.d where systemd has it.
if command -v systemd-sysusers >/dev/null 2>&1; then
	systemd-sysusers vmegress.conf
elif ! grep -q '^vmegress:' /etc/group 2>/dev/null; then
	if command -v groupadd >/dev/null 2>&1; then
		groupadd --system vmegress
	else
		addgroup -S vmegress
	fi
fi

# /run/vmegress, /var/lib/vmegress, /var/log/vmegress (tmpfiles.d).
if command -v systemd-tmpfiles >/dev/null 2>&1; then
	systemd-tmpfiles --create vmegress.conf
else
	mkdir -p /run/vmegress /var/lib/vmegress /var/log/vmegress
	chmod 0755 /run/vmegress
	chmod 0700 /var/lib/vmegress
	chmod 0750 /var/log/vmegress
fi

if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || true
	if [ -n "$upgrade" ]; then
		systemctl try-restart vmegress.service ||
			echo "vmegress: the restart after the upgrade failed: journalctl -u vmegress" >&2
	fi
fi
if [ -z "$upgrade" ]; then
	echo "vmegress installed. Edit /etc/vmegress/config.yaml, check it with"
	echo "'vmegress policy check', then (as root): systemctl enable --now vmegress"
fi
exit 0
