# The Debian package's life in the container of systemd-container-test.sh --deb: sourced by that
# script, whose functions (inside, prop, pass, fail, echo_through, session_*...) these use.
#
# What is checked, in order: with /opt (the Swift toolchain) hidden, `apt-get install` of the
# package; the binary runs and links no Swift library; the units are installed but neither
# enabled nor started, and nothing listens; `man -w` finds sameport(1) and sameport.toml(5);
# bash completes `sameport --eg` to `--egress`; `sameport check` passes on the conffile;
# `systemctl enable --now sameport.socket` runs the default relay, and the upstream sees the
# fixed source port; an upgrade to a newer version (the same package, its version bumped)
# restarts nothing: same PID, same socket, an open connection relays on; `apt-get remove`
# stops the service and the socket and keeps the conffile; `apt-get purge` removes it.

# prepare_debs PACKAGE DIRECTORY: PACKAGE, and a copy whose version is PACKAGE's plus "+test1"
# (newer to dpkg), into DIRECTORY. Sets deb_version, deb_bumped_version, deb_file, deb_bumped_file.
prepare_debs() {
    local unpacked="$workdir/bumped" arch
    deb_version=$(dpkg-deb -f "$1" Version)
    deb_bumped_version="$deb_version+test1"
    arch=$(dpkg-deb -f "$1" Architecture)
    deb_file=$(basename "$1")
    deb_bumped_file="sameport_${deb_bumped_version}_$arch.deb"
    cp "$1" "$2/$deb_file"
    dpkg-deb -R "$1" "$unpacked"
    sed -i "s/^Version: .*/Version: $deb_bumped_version/" "$unpacked/DEBIAN/control"
    # -Znone: a copy for this test only, built in a second rather than compressed for a minute.
    dpkg-deb --root-owner-group -Znone -b "$unpacked" "$2/$deb_bumped_file" >/dev/null
    rm -rf "$unpacked"
}

# apt_get ARGUMENTS...: apt-get in the container, non-interactive. The container has no network:
# every dependency must be installed on the host already (--no-download would say so more
# plainly, but apt 2.6 then refuses a local .deb: "Pathname to install is not absolute").
# Output in $apt_output.
apt_get() {
    apt_output=$(inside_timeout=300 inside env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" 2>&1)
}

package_status() { inside dpkg-query -W -f '${Status} ${Version}' sameport 2>/dev/null || true; }

deb_checks() {
    local debs=/srv/sameport-test-debs
    # This machine's image is Docker-style: /usr/sbin/policy-rc.d refuses every start and stop
    # (exit 101), which would keep the maintainer scripts from stopping anything. A server has
    # none; it is removed in the container's overlay only.
    inside rm -f /usr/sbin/policy-rc.d

    [ -z "$(inside ls -A /opt)" ] || fail "an empty /opt in the container (no Swift toolchain); saw: $(inside ls -A /opt | tr '\n' ' ')"
    ! inside test -e /usr/bin/sameport && ! inside test -e /etc/sameport && [ -z "$(package_status | grep -v not-installed)" ] ||
        fail "no sameport before the install; saw '$(package_status)', $(inside ls -d /usr/bin/sameport /etc/sameport 2>&1 | tr '\n' ' ')"
    pass "the container has no Swift toolchain (/opt is an empty tmpfs) and no sameport"

    apt_get install "$debs/$deb_file" || fail "apt-get install $deb_file to succeed; saw: $(tail -n 8 <<<"$apt_output" | tr "\n" " ")"
    [ "$(package_status)" = "install ok installed $deb_version" ] ||
        fail "sameport $deb_version installed; dpkg-query says '$(package_status)'"
    pass "apt-get install $debs/$deb_file: sameport $deb_version is installed"

    local libraries version
    libraries=$(inside ldd /usr/bin/sameport)
    ! grep -q -e swift -e Foundation -e dispatch -e /opt/ -e 'not found' <<<"$libraries" ||
        fail "no Swift library linked by /usr/bin/sameport; ldd says: $libraries"
    version=$(inside /usr/bin/sameport --version) || fail "sameport --version to succeed without /opt; saw: $version"
    [ "${version%% *}" = "$deb_version" ] || fail "sameport --version to say $deb_version (the package's version); saw '$version'"
    pass "sameport --version says '$version' with /opt hidden; it links only $(awk '{ print $1 }' <<<"$libraries" | tr '\n' ' ')"

    local enabled
    enabled=$(inside systemctl is-enabled sameport.socket 2>/dev/null || true)
    [ "$enabled" = disabled ] && is_state sameport.socket inactive && is_state sameport.service inactive ||
        fail "sameport.socket installed but neither enabled nor started; saw is-enabled=$enabled, socket $(unit_state sameport.socket), service $(unit_state sameport.service)"
    [ -z "$(inside ss -Hltn 'sport = :7700')" ] || fail "nothing listening on 7700 after the install; saw: $(inside ss -Hltn 'sport = :7700')"
    inside systemd-analyze verify sameport.socket sameport.service >/dev/null 2>&1 ||
        fail "systemd-analyze verify to accept the installed units; saw: $(inside systemd-analyze verify sameport.socket sameport.service 2>&1)"
    pass "the units are installed (systemd-analyze verify accepts them) but sameport.socket is $enabled and inactive: nothing listens"

    local page1 page5
    page1=$(inside man -w sameport) && page5=$(inside man -w sameport.toml) ||
        fail "man -w to find sameport and sameport.toml; saw '${page1:-}' '${page5:-}'"
    [ "$page1" = /usr/share/man/man1/sameport.1.gz ] && [ "$page5" = /usr/share/man/man5/sameport.toml.5.gz ] ||
        fail "the pages in man1 and man5; saw '$page1' '$page5'"
    inside env MANPAGER=cat MANWIDTH=100 man sameport 2>/dev/null | has -- '--egress mode' &&
        inside env MANPAGER=cat MANWIDTH=100 man 5 sameport.toml 2>/dev/null | has 'drain_timeout' ||
        fail "man sameport to show '--egress mode' and man 5 sameport.toml drain_timeout"
    pass "man -w: $page1 and $page5 (they show '--egress mode' and drain_timeout)"

    local completion
    # bash-completion loads /usr/share/bash-completion/completions/sameport on demand, as on a
    # first TAB (its loader returns 124, "completion changed, try again"); then the function it
    # registered completes `sameport --eg`.
    completion=$(inside bash -c 'source /usr/share/bash-completion/bash_completion && { _completion_loader sameport || true; } &&
        COMP_LINE="sameport --eg" && COMP_WORDS=(sameport --eg) && COMP_CWORD=1 && COMP_POINT=${#COMP_LINE} &&
        function=$(complete -p sameport | sed -n "s/.* -F \([^ ]*\) .*/\1/p") && "$function" sameport --eg sameport &&
        echo "${COMPREPLY[*]}"' 2>&1) || true
    [ "$completion" = --egress ] || fail "bash to complete 'sameport --eg' to --egress; saw '$completion'"
    pass "bash completion: 'sameport --eg<TAB>' gives --egress"

    local check
    check=$(inside sameport check /etc/sameport/sameport.toml 2>&1) || fail "sameport check /etc/sameport/sameport.toml to pass; saw: $check"
    grep -q 'configuration OK' <<<"$check" || fail "'configuration OK' from sameport check; saw: $check"
    inside dpkg-query -W -f '${Conffiles}\n' sameport | has '^ /etc/sameport/sameport.toml ' ||
        fail "/etc/sameport/sameport.toml a conffile; dpkg-query says: $(inside dpkg-query -W -f '${Conffiles}' sameport)"
    pass "sameport check /etc/sameport/sameport.toml: $(tail -n 1 <<<"$check") (a conffile; relay: $(sed -n 2p <<<"$check" | awk '{ print $1, $2, "->", $3 }'))"

    inside systemctl enable --now sameport.socket 2>/dev/null || fail "systemctl enable --now sameport.socket; saw $(unit_state sameport.socket)"
    [ "$(inside systemctl is-enabled sameport.socket)" = enabled ] && [ "$(prop sameport.socket SubState)" = listening ] ||
        fail "sameport.socket enabled and listening; saw $(unit_state sameport.socket)"
    echo_through 7700 "the packaged default relay, activated by sameport.socket" sameport.service
    wait_for 5 is_state sameport.service active || fail "sameport.service active; saw $(unit_state sameport.service)"
    wait_for 5 saw_peer 127.0.0.1:7700 1 || fail "the upstream to see source 127.0.0.1:7700; saw: $(peers)"
    prop sameport.service ExecStart | has 'path=/usr/bin/sameport ' || fail "ExecStart= to run /usr/bin/sameport; saw: $(prop sameport.service ExecStart)"
    pass "systemctl enable --now sameport.socket: the first client started /usr/bin/sameport, $echoed, and the upstream saw it from 127.0.0.1:7700"

    # The upgrade, with a connection open: nothing restarts.
    local mainpid socket_since
    session_start 7700
    session_do "send before-upgrade" "ok before-upgrade"
    mainpid=$(prop sameport.service MainPID)
    socket_since=$(prop sameport.socket ActiveEnterTimestampMonotonic)
    apt_get install "$debs/$deb_bumped_file" || fail "apt-get install $deb_bumped_file to succeed; saw: $(tail -n 8 <<<"$apt_output" | tr "\n" " ")"
    [ "$(package_status)" = "install ok installed $deb_bumped_version" ] ||
        fail "sameport $deb_bumped_version installed; dpkg-query says '$(package_status)'"
    is_state sameport.service active && [ "$(prop sameport.service MainPID)" = "$mainpid" ] && [ "$(prop sameport.service NRestarts)" = 0 ] ||
        fail "sameport.service still running as PID $mainpid after the upgrade; saw $(unit_state sameport.service) MainPID=$(prop sameport.service MainPID)"
    [ "$(prop sameport.socket ActiveEnterTimestampMonotonic)" = "$socket_since" ] && [ "$(inside systemctl is-enabled sameport.socket)" = enabled ] ||
        fail "sameport.socket neither restarted nor disabled by the upgrade; saw $(unit_state sameport.socket), since $(prop sameport.socket ActiveEnterTimestampMonotonic) (was $socket_since)"
    session_do "send after-upgrade" "ok after-upgrade"
    pass "upgrade $deb_version -> $deb_bumped_version: sameport.service not restarted (PID $mainpid), sameport.socket not restarted and still enabled, the open connection relays on"
    session_end
    echo_through 7700 "a client after the upgrade" sameport.service
    pass "a new client after the upgrade is relayed: $echoed"

    apt_get remove sameport || fail "apt-get remove sameport to succeed; saw: $(tail -n 8 <<<"$apt_output" | tr "\n" " ")"
    wait_for 10 is_state sameport.service inactive && is_state sameport.socket inactive ||
        fail "apt-get remove to stop sameport.service and sameport.socket; saw service $(unit_state sameport.service), socket $(unit_state sameport.socket)"
    [ -z "$(inside ss -Hltn 'sport = :7700')" ] || fail "nothing listening on 7700 after the removal; saw: $(inside ss -Hltn 'sport = :7700')"
    inside test -f /etc/sameport/sameport.toml && ! inside test -e /usr/bin/sameport &&
        [ "$(package_status)" = "deinstall ok config-files $deb_bumped_version" ] ||
        fail "the conffile kept and the binary gone after apt-get remove; saw status '$(package_status)', $(inside ls /etc/sameport /usr/bin/sameport 2>&1 | tr '\n' ' ')"
    pass "apt-get remove: sameport.service and sameport.socket stopped, nothing listens, /etc/sameport/sameport.toml kept ($(package_status))"

    apt_get purge sameport || fail "apt-get purge sameport to succeed; saw: $(tail -n 8 <<<"$apt_output" | tr "\n" " ")"
    ! inside test -e /etc/sameport && ! inside test -e /etc/systemd/system/sockets.target.wants/sameport.socket &&
        [ -z "$(package_status | grep -v not-installed)" ] ||
        fail "apt-get purge to remove /etc/sameport and the socket's enablement; saw '$(package_status)', $(inside ls -d /etc/sameport /etc/systemd/system/sockets.target.wants/sameport.socket 2>&1 | tr '\n' ' ')"
    pass "apt-get purge: /etc/sameport and the socket's enablement are gone"
}
