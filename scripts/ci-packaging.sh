#!/usr/bin/env bash
# Packaging CI (issue 17), as root on Debian: installs rpm, prometheus (for
# promtool) and busybox-static, checks the alert rules with promtool, builds
# the .deb and .rpm with `go run ./packaging/build`, then, in a throwaway
# network namespace (so `vmegress up/down` and the daemon touch nothing of the
# machine's own network):
#   - installs the .deb with apt-get install ./FILE (as README says), checks every file, the group, the
#     directories, `vmegress version`, `policy check` of the default config,
#     `systemd-analyze verify` of the installed unit, the man pages and
#     completions (live project names included), runs the installed daemon
#     and `vmegress doctor`; upgrades to a rebuilt package with a changed
#     default config and checks that the admin's changed config is left alone
#     and that a running daemon is try-restarted; removes it (daemon stopped
#     and disabled, `vmegress down` run: the interception is gone) and purges
#     it (state gone);
#   - installs the .rpm into a scratch root (rpm --root, busybox as its shell)
#     and checks its files (rpm -V), its scriptlets (group, directories, no
#     enable on install, try-restart on upgrade, config kept as .rpmnew,
#     disable + down on erase).
# systemd is not PID 1 here: a fake systemctl records what the scriptlets ask
# of it, with /run/systemd/system present so they believe systemd runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

if [ "${1:-}" = --sandboxed ]; then
	shift
	sandboxed=1
else
	sandboxed=
fi

fail() {
	echo "FAIL: $*" >&2
	exit 1
}
pass() { echo "ok: $*"; }

# ---------------------------------------------------------------- outside
if [ -z "$sandboxed" ]; then
	t0=$SECONDS
	need=()
	for c in rpm:rpm promtool:prometheus busybox:busybox-static unshare:util-linux nft:nftables ip:iproute2 curl:curl systemd-analyze:systemd; do
		command -v "${c%%:*}" >/dev/null 2>&1 || need+=("${c#*:}")
	done
	if [ ${#need[@]} -gt 0 ]; then
		echo "installing: ${need[*]}"
		# The prometheus package must not start a server here: policy-rc.d
		# (exit 101: action forbidden) while it installs, unless one exists.
		made_policy=
		if [ ! -e /usr/sbin/policy-rc.d ]; then
			printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
		fi
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
		[ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
	fi
	echo "tools installed in $((SECONDS - t0)) s"

	promtool check rules packaging/prometheus/alerts.yml
	(cd packaging/prometheus && promtool test rules alerts_test.yml)

	work=$(mktemp -d /tmp/vmegress-pkg.XXXXXX)
	trap 'rm -rf "$work"' EXIT
	t1=$SECONDS
	# v1: both formats for amd64 and arm64 (proves the cross build).
	go run ./packaging/build -version 1.0.0 -out "$work/v1" >/dev/null
	# v2: a rebuilt package whose default config differs, amd64 only.
	sed "s#packaging/etc/config.yaml#$work/config-v2.yaml#" packaging/nfpm.yaml >"$work/nfpm-v2.yaml"
	{ cat packaging/etc/config.yaml; echo "# changed in 1.0.1"; } >"$work/config-v2.yaml"
	go run ./packaging/build -version 1.0.1 -arch amd64 -config "$work/nfpm-v2.yaml" -out "$work/v2" >/dev/null
	echo "packages built in $((SECONDS - t1)) s"
	for f in vmegress_1.0.0-1_amd64.deb vmegress_1.0.0-1_arm64.deb vmegress-1.0.0-1.x86_64.rpm vmegress-1.0.0-1.aarch64.rpm; do
		[ -s "$work/v1/$f" ] || fail "build did not write $f"
	done
	[ "$(dpkg-deb -f "$work/v1/vmegress_1.0.0-1_arm64.deb" Architecture)" = arm64 ] || fail "arm64 .deb architecture"
	dpkg-deb -x "$work/v1/vmegress_1.0.0-1_arm64.deb" "$work/arm64"
	# ELF e_machine, at offset 18: 0xb7 0x00 is AArch64.
	machine=$(od -An -tx1 -j18 -N2 "$work/arm64/usr/bin/vmegress" | tr -d ' ')
	[ "$machine" = b700 ] || fail "the arm64 package's binary is not AArch64 (e_machine $machine)"
	pass "built .deb and .rpm for amd64 and arm64"

	# Serialized with the end-to-end tests: they must not see a half-installed package.
	exec 9>/tmp/vmegress-e2e.lock
	t2=$SECONDS
	flock 9
	echo "waited $((SECONDS - t2)) s for the end-to-end lock"
	t3=$SECONDS
	unshare --net --mount -- bash "$0" --sandboxed "$work"
	echo "installed, upgraded and removed in $((SECONDS - t3)) s; packaging CI passed in $((SECONDS - t0)) s"
	exit 0
fi

# ---------------------------------------------------------------- sandboxed
work=$1
ip link set lo up
# The machine's own copy must not be there (and is put back by nobody).
if dpkg -s vmegress >/dev/null 2>&1; then
	fail "vmegress is already installed on this machine; remove it first"
fi
trap 'dpkg -P vmegress >/dev/null 2>&1 || true' EXIT

# A fake systemd: /run/systemd/system (private tmpfs) and a systemctl that logs.
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system "$work/fakebin"
log=$work/systemctl.log
cat >"$work/fakebin/systemctl" <<EOF
#!/bin/sh
echo "\$*" >>$log
exit 0
EOF
chmod 755 "$work/fakebin/systemctl"
export PATH=$work/fakebin:$PATH
: >"$log"

deb1=$work/v1/vmegress_1.0.0-1_amd64.deb
deb2=$work/v2/vmegress_1.0.1-1_amd64.deb

# mode owner group path: every file and directory the package must make.
expect_files() {
	local zsh=$1
	cat <<EOF
755 root root /usr/bin/vmegress
644 root root /usr/lib/systemd/system/vmegress.service
644 root root /usr/lib/sysusers.d/vmegress.conf
644 root root /usr/lib/tmpfiles.d/vmegress.conf
644 root root /etc/vmegress/config.yaml
644 root root /etc/logrotate.d/vmegress
644 root root /usr/share/bash-completion/completions/vmegress
644 root root $zsh/_vmegress
644 root root /usr/share/fish/vendor_completions.d/vmegress.fish
644 root root /usr/share/man/man1/vmegress.1.gz
644 root root /usr/share/man/man1/vmegress-net-down.1.gz
644 root root /usr/share/man/man1/vmegress-policy-explain.1.gz
644 root root /usr/share/vmegress/grafana/vmegress.json
644 root root /usr/share/vmegress/prometheus/alerts.yml
644 root root /usr/share/vmegress/systemd/envoy-microvm-egress.service
EOF
}
check_files() { # ROOT ZSHDIR
	local root=$1 mode owner group path got
	while read -r mode owner group path; do
		[ -f "$root$path" ] || fail "missing $path"
		got=$(stat -c '%a %U %G' "$root$path")
		[ "$got" = "$mode $owner $group" ] || fail "$path is $got, want $mode $owner $group"
	done < <(expect_files "$2")
	# Nothing the list does not know about, but man pages.
	local n
	n=$(expect_files "$2" | grep -vc '/man1/')
	pass "$n files (and the man pages) with their modes under ${root:-/}"
}

# ---- .deb: install
# The README's command: apt install ./FILE (apt resolves the dependencies from
# what is installed: no network here). DPkg::Path: apt runs dpkg with its own
# PATH, which would hide the fake systemctl.
apt_install() {
	DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Path="$PATH" "$@"
}
out=$(apt_install "$deb1" 2>&1) || fail "apt-get install: $out"
echo "$out" | grep -q "systemctl enable --now vmegress" || fail "install did not say how to enable it: $out"
check_files "" /usr/share/zsh/vendor-completions
[ "$(dpkg-query -W -f '${Conffiles}' vmegress | awk '{print $1}' | sort | tr '\n' ' ')" = "/etc/logrotate.d/vmegress /etc/vmegress/config.yaml " ] ||
	fail "conffiles: $(dpkg-query -W -f '${Conffiles}' vmegress)"
dpkg -V vmegress || fail "dpkg -V"
# deb packages list every file: nothing unlisted ships.
nfiles=$(dpkg -L vmegress | while read -r p; do [ -f "$p" ] && echo "$p"; done | grep -vc '/man1/')
[ "$nfiles" = "$(expect_files /usr/share/zsh/vendor-completions | grep -vc '/man1/')" ] || fail "the .deb has $nfiles files outside man1: $(dpkg -L vmegress)"
getent group vmegress >/dev/null || fail "group vmegress not created"
[ "$(stat -c %a /var/lib/vmegress)" = 700 ] || fail "/var/lib/vmegress mode"
[ -d /run/vmegress ] && [ -d /var/log/vmegress ] || fail "tmpfiles.d directories missing"
pass "group vmegress, /run/vmegress, /var/lib/vmegress (0700), /var/log/vmegress"
if grep -Eq 'enable|start|restart' "$log"; then fail "install asked systemd for: $(cat "$log")"; fi
grep -qx daemon-reload "$log" || fail "no daemon-reload on install"
pass "install enabled and started nothing ($(tr '\n' ';' <"$log"))"

[ "$(vmegress version)" = "vmegress 1.0.0" ] || fail "vmegress version: $(vmegress version)"
vmegress policy check >/dev/null || fail "the default config does not pass policy check"
out=$(systemd-analyze verify /usr/lib/systemd/system/vmegress.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
pass "vmegress version, policy check of /etc/vmegress/config.yaml, systemd-analyze verify"

zcat /usr/share/man/man1/vmegress-net-down.1.gz | grep -q 'vmegress net down PROJECT' || fail "man page of net down"
if command -v man >/dev/null 2>&1; then
	MANPAGER=cat man -P cat vmegress-net-down 2>/dev/null | grep -q "Remove the project's TAP" || fail "man vmegress-net-down"
fi
bash -c 'source /usr/share/bash-completion/completions/vmegress && declare -F __start_vmegress >/dev/null' || fail "bash completion"
cfg=$work/projects.yaml
printf 'projects:\n  alpha: {}\n  beta: {}\n' >"$cfg"
got=$(vmegress --config "$cfg" __complete net down '' 2>/dev/null | head -2 | tr '\n' ' ')
[ "$got" = "alpha beta " ] || fail "project completion: $got"
pass "man pages, bash completion, project names complete"

# The installed daemon on the default config, then doctor.
vmegress up >/dev/null
vmegress run >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do
	curl -sf http://127.0.0.1:9901/readyz >/dev/null 2>&1 && break
	sleep 0.1
done
curl -sf http://127.0.0.1:9901/readyz >/dev/null || fail "the installed daemon is not ready: $(cat "$work/daemon.log")"
vmegress doctor --json >"$work/doctor.json" || true
python3 - "$work/doctor.json" <<'EOF' || fail "doctor: $(cat "$work/doctor.json")"
import json, sys
bad = [r["name"] for r in json.load(open(sys.argv[1])) if not r["ok"] and r["name"] != "upstream DNS"]
if bad:
    sys.exit("doctor failed: %s" % bad)
EOF
pass "installed daemon ready; doctor passes every check but upstream DNS (no network here)"
kill "$daemon"
wait "$daemon" || true
nft list table inet vmegress >/dev/null || fail "interception did not stay after the daemon stopped"

# ---- .deb: upgrade with a changed config
echo "# changed by the admin" >>/etc/vmegress/config.yaml
: >"$log"
out=$(apt_install -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$deb2" 2>&1) ||
	fail "apt-get install (upgrade): $out"
grep -q "changed by the admin" /etc/vmegress/config.yaml || fail "the upgrade replaced the changed config"
grep -q "changed in 1.0.1" /etc/vmegress/config.yaml && fail "the upgrade merged the new default into the changed config"
grep -q "changed in 1.0.1" /etc/vmegress/config.yaml.dpkg-dist || fail "the new default config was not left as .dpkg-dist"
[ "$(vmegress version)" = "vmegress 1.0.1" ] || fail "version after upgrade: $(vmegress version)"
grep -qx "try-restart vmegress.service" "$log" || fail "upgrade did not try-restart: $(cat "$log")"
if grep -Eq 'stop|disable' "$log"; then fail "upgrade stopped the daemon: $(cat "$log")"; fi
nft list table inet vmegress >/dev/null || fail "the upgrade removed the interception"
pass "upgrade: changed config kept (new one as .dpkg-dist), try-restart, interception kept"

# ---- .deb: remove, purge
: >"$log"
out=$(dpkg -r vmegress 2>&1) || fail "dpkg -r: $out"
echo "$out" | grep -q "interception removed" || fail "remove did not run vmegress down: $out"
grep -qx "\-\-no-reload disable --now vmegress.service" "$log" || fail "remove did not stop and disable: $(cat "$log")"
if nft list table inet vmegress >/dev/null 2>&1; then fail "the interception outlived the package"; fi
[ ! -e /usr/bin/vmegress ] || fail "/usr/bin/vmegress left after remove"
[ -f /etc/vmegress/config.yaml ] && [ -d /var/lib/vmegress ] || fail "remove deleted config or state"
pass "remove: daemon stopped and disabled, vmegress down ran, config and state kept"
dpkg -P vmegress >/dev/null 2>&1 || fail "dpkg -P"
[ ! -e /var/lib/vmegress ] && [ ! -e /etc/vmegress ] || fail "purge left /var/lib/vmegress or /etc/vmegress"
pass "purge: state and config gone"

# ---- .rpm into a scratch root, busybox as its /bin/sh
root=$work/rpmroot
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,tmp,run/systemd/system}
cp "$(command -v busybox)" "$root/bin/busybox"
chroot "$root" /bin/busybox --install -s /bin
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
mount -t proc proc "$root/proc"
cat >"$root/usr/sbin/systemctl" <<'EOF'
#!/bin/sh
echo "$*" >>/tmp/systemctl.log
exit 0
EOF
chmod 755 "$root/usr/sbin/systemctl"
# shadow-utils' groupadd, as far as the scriptlet uses it (busybox has none).
cat >"$root/usr/sbin/groupadd" <<'EOF'
#!/bin/sh
[ "$1" = --system ] && [ -n "$2" ] || exit 2
echo "$2:x:999:" >>/etc/group
EOF
chmod 755 "$root/usr/sbin/groupadd"
mkdir -p "$root/dev" && mknod -m 666 "$root/dev/null" c 1 3
# nft (what `vmegress down` runs) with its libraries, as nftables would bring it.
nft=$(command -v nft)
for f in "$nft" $(ldd "$nft" | grep -o '/[^ ]*'); do
	cp --parents -L "$f" "$root"
done
rlog=$root/tmp/systemctl.log
rpm1=$work/v1/vmegress-1.0.0-1.x86_64.rpm
rpm2=$work/v2/vmegress-1.0.1-1.x86_64.rpm
rpm --root "$root" --initdb
out=$(rpm --root "$root" -i --nodeps "$rpm1" 2>&1) || fail "rpm -i: $out"
echo "$out" | grep -q "scriptlet failed" && fail "rpm -i: $out"
echo "$out" | grep -q "systemctl enable --now vmegress" || fail "rpm install did not say how to enable it: $out"
check_files "$root" /usr/share/zsh/site-functions
rpm --root "$root" -V vmegress || fail "rpm -V"
[ "$(rpm --root "$root" -qc vmegress | sort | tr '\n' ' ')" = "/etc/logrotate.d/vmegress /etc/vmegress/config.yaml " ] || fail "rpm config files"
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpm1" | grep -q '^cn /etc/vmegress/config.yaml$' || fail "config.yaml is not %config(noreplace)"
grep -q '^vmegress:' "$root/etc/group" || fail "rpm scriptlet did not add the group"
[ "$(stat -c %a "$root/var/lib/vmegress")" = 700 ] || fail "rpm: /var/lib/vmegress mode"
if grep -Eq 'enable|start|restart' "$rlog"; then fail "rpm install asked systemd for: $(cat "$rlog")"; fi
[ "$(chroot "$root" /usr/bin/vmegress version)" = "vmegress 1.0.0" ] || fail "vmegress version in the rpm root"
pass "rpm: files (rpm -V), %config(noreplace), group, directories, nothing enabled"
echo "# changed by the admin" >>"$root/etc/vmegress/config.yaml"
: >"$rlog"
out=$(rpm --root "$root" -U --nodeps "$rpm2" 2>&1) || fail "rpm -U: $out"
echo "$out" | grep -q "scriptlet failed" && fail "rpm -U: $out"
grep -q "changed by the admin" "$root/etc/vmegress/config.yaml" || fail "rpm upgrade replaced the changed config"
grep -q "changed in 1.0.1" "$root/etc/vmegress/config.yaml.rpmnew" || fail "rpm upgrade did not leave config.yaml.rpmnew"
grep -qx "try-restart vmegress.service" "$rlog" || fail "rpm upgrade did not try-restart: $(cat "$rlog")"
if grep -Eq 'stop|disable' "$rlog"; then fail "rpm upgrade stopped the daemon: $(cat "$rlog")"; fi
pass "rpm upgrade: changed config kept (new one as .rpmnew), try-restart"
: >"$rlog"
out=$(rpm --root "$root" -e vmegress 2>&1) || fail "rpm -e: $out"
echo "$out" | grep -q "scriptlet failed" && fail "rpm -e: $out"
echo "$out" | grep -q "interception removed" || fail "rpm erase did not run vmegress down: $out"
grep -qx "\-\-no-reload disable --now vmegress.service" "$rlog" || fail "rpm erase did not stop and disable: $(cat "$rlog")"
[ ! -e "$root/usr/bin/vmegress" ] || fail "rpm erase left the binary"
[ -f "$root/etc/vmegress/config.yaml.rpmsave" ] || fail "rpm erase did not keep the changed config as .rpmsave"
pass "rpm erase: stopped and disabled, vmegress down ran, changed config kept as .rpmsave"
umount "$root/proc"
