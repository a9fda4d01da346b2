#!/usr/bin/env bash
# Builds the keel container image offline: a release build of the keel binary and
# the few shared libraries it loads (glibc, libm, libgcc_s, the loader), on an
# empty base. glibc's host lookup (files, then DNS) is part of libc itself, so
# names resolve as on any Linux host: Docker's resolver answers for service names.
#
#   deploy/image.sh [TAG]      default TAG: keel:<version>, also tagged keel:latest
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
tag=${1:-keel:$version}

echo "== building the keel binary (release)"
cargo build --release --locked -p keel
bin=target/release/keel

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root="$stage/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc" "$stage/data"
# The image carries the code alone (23 MB rather than 29 with symbols, 128 with
# debug line tables): a backtrace from it shows addresses, which `addr2line -e
# target/release/keel` turns into names on the machine that built it.
objcopy --strip-all "$bin" "$root/usr/local/bin/keel"

# Every library the loader would map, at the path it would map it from.
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' |
  while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0::/:/nonexistent\nkeel:x:65532:65532::/data:/nonexistent\n' >"$root/etc/passwd"
printf 'root:x:0:\nkeel:x:65532:\n' >"$root/etc/group"
cp deploy/Dockerfile "$stage/Dockerfile"

echo "== building the image $tag"
docker build --quiet --tag "$tag" --tag keel:latest "$stage" >/dev/null
docker run --rm "$tag" --version
size=$(docker image inspect --format '{{.Size}}' "$tag")
echo "$tag: $((size / 1024 / 1024)) MiB"
