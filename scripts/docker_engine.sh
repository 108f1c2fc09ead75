#!/usr/bin/env bash
# Start, stop or query a local Docker engine for the image build and the containerised pipeline test.
#
#   scripts/docker_engine.sh start    install docker.io + debootstrap if missing, start dockerd, wait for it
#   scripts/docker_engine.sh stop     stop the dockerd this script started (its pid file), nothing else
#   scripts/docker_engine.sh status   exit 0 when an engine answers, 1 otherwise
#
# An engine that already answers (a developer's own Docker) is used as it is and never stopped.
# Otherwise this starts Debian's dockerd as root with its data root in $MAMMOSEG_DOCKER_ROOT
# (default /var/lib/mammoseg-docker): kept between runs, so the debootstrapped base and an image
# whose content hash is unchanged are not rebuilt. No bridge/iptables set-up: the pipeline's
# containers use the host network (to reach the tracking server on 127.0.0.1) and so does the
# build, which needs no network at all (wheelhouse). Log: $MAMMOSEG_DOCKER_ROOT.log.
set -euo pipefail

data_root="${MAMMOSEG_DOCKER_ROOT:-/var/lib/mammoseg-docker}"
pid_file="${data_root}.pid"
log_file="${data_root}.log"
socket=/var/run/docker.sock

answers() { timeout 20 docker info >/dev/null 2>&1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
    else echo "docker_engine.sh: '$*' needs root (or password-less sudo)" >&2; return 1
    fi
}

install_missing() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "docker_engine.sh: installing ${missing[*]} with apt-get" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >/dev/null
    fi
}

start() {
    if answers; then
        return 0
    fi
    install_missing
    as_root mkdir -p "$data_root"
    # Debian's docker.io also ships containerd and runc; dockerd starts its own containerd child.
    as_root bash -c "nohup dockerd --data-root '$data_root' --pidfile '$pid_file' --host 'unix://$socket' \
        --bridge=none --iptables=false --ip6tables=false --ip-masq=false --storage-driver=overlay2 \
        >'$log_file' 2>&1 </dev/null &"
    for _ in $(seq 120); do
        if answers; then
            return 0
        fi
        sleep 0.5
    done
    echo "docker_engine.sh: dockerd did not answer within 60 s; last lines of $log_file:" >&2
    tail -n 20 "$log_file" >&2 || true
    return 1
}

stop() {
    if [ -f "$pid_file" ]; then
        local pid
        pid="$(cat "$pid_file")"
        as_root kill "$pid" 2>/dev/null || true
        for _ in $(seq 60); do
            kill -0 "$pid" 2>/dev/null || return 0
            sleep 0.5
        done
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) answers ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
