#!/usr/bin/env bash
# Build a local stand-in for python:3.11-slim-bookworm (no registry is reachable here): Debian bookworm
# minbase + python3 (3.11) + venv from Debian's packages, imported into Docker as IMAGE.
#   bash tests/deploy/make_base_image.sh IMAGE CACHE_DIR
# The root filesystem tarball is cached in CACHE_DIR; the host's extra CA certificates (an egress
# proxy's, if any) are added so that pip inside `docker build` reaches PyPI as the host does.
set -euo pipefail
image=$1
cache=$2
tarball="$cache/bookworm-python3.tar"
mkdir -p "$cache"
if [ ! -f "$tarball" ]; then
    rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    chroot "$rootfs" apt-get clean
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    "$tarball" "$image" >/dev/null
echo "$image"
