#!/bin/sh
# Debian packages nitro's build, tests, demo and benchmarks need.
# Idempotent: runs apt only when something is missing.
set -eu
PKGS="qemu-system-x86 qemu-utils busybox-static linux-image-amd64 kmod cpio
      liburing-dev libssl-dev libcryptsetup-dev cryptsetup-bin fio
      systemd e2fsprogs gcc make iproute2
      prometheus strace libseccomp-dev
      dpdk dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23
      openvswitch-switch-dpdk
      clang-14 libclang-rt-14-dev
      etcd-server etcd-client tshark
      nbdkit libnbd-dev libnbd-bin
      ceph-mon ceph-mgr ceph-osd librbd-dev libradospp-dev g++ qemu-block-extra"
# clang-14/libclang-rt: libFuzzer + sanitizer runtimes (tests/fuzz).
# etcd-server/tshark: the fleet (docs/fleet.md). nbdkit/libnbd, ceph and
# qemu-block-extra (qsd's nbd/rbd drivers): remote volumes (docs/volumes.md).
# libradospp-dev, g++: librbd's C++ read call (cffi_build/nitro_rbd_bl.cpp).
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "install-deps: installing:$missing"
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi
