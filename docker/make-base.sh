#!/bin/sh
# `make docker-base`: a local Debian bookworm base image made from Debian packages alone, for build
# hosts that cannot pull python:3.11-slim from a registry. bookworm's python3 is 3.11, matching the
# cp311 wheels of the wheelhouse. Usage: docker/make-base.sh IMAGE [MIRROR]
# Needs root, debootstrap and a Docker daemon; the root file system is built in a temporary
# directory that is removed whatever happens.
set -eu
image=${1:?usage: docker/make-base.sh IMAGE [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

fail() { echo "error: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || fail "make docker-base needs root (debootstrap and chroot): run it as root"
command -v debootstrap >/dev/null || fail "debootstrap is not installed: apt-get install debootstrap"
$docker info >/dev/null 2>&1 || fail "no Docker daemon is reachable: start dockerd (apt-get install docker.io)"

rootfs=$(mktemp -d /tmp/deepreduce-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT INT TERM
echo "debootstrap bookworm (minbase + python3, python3-venv) into $rootfs ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; fail "debootstrap failed (see above)"; }
rm -f "$rootfs.log"
# Slim down: package caches, lists, docs and man pages are not needed in an image.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
tar --numeric-owner -C "$rootfs" -c . | $docker import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
    --message "debootstrap bookworm minbase + python3 (make docker-base)" - "$image" >/dev/null
echo "created $image ($($docker image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
