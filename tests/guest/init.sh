#!/bin/sh
# /init (PID 1) of the nitro test guest; tests/guest/build.py packs it.
#
# The contract with tests/guest/qemu.py, which reads the serial console:
#   - the test script arrives through fw_cfg as opt/nitro.script;
#   - "NITRO-GUEST-START" is printed just before the script runs;
#   - "NITRO-GUEST-EXIT=<rc>" is printed after it, with its exit status;
#   - then the guest powers off, so QEMU (run with -no-reboot) exits.
# Lines starting "nitro-init:" are this file's own diagnostics.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# No ld.so.cache in the initramfs: name the library directories outright.
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu/ceph
export HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/cryptsetup /run/lock

# One module per line, in dependency order: "req PATH" must load (a failure
# is reported), "opt PATH" may fail quietly (e.g. crc32c-intel on a CPU model
# without SSE4.2 while crc32c-generic serves instead).
while read -r kind path; do
    if [ "$kind" = opt ]; then
        insmod "$path" 2>/dev/null
    else
        insmod "$path" || echo "nitro-init: insmod $path failed"
    fi
done < /etc/nitro/modules

ip link set lo up 2>/dev/null

script=/sys/firmware/qemu_fw_cfg/by_name/opt/nitro.script/raw
if [ -r "$script" ]; then
    cat "$script" > /tmp/nitro.script
    echo "NITRO-GUEST-START"
    cd /tmp && sh /tmp/nitro.script < /dev/null
    rc=$?
    cd /
else
    echo "nitro-init: no test script at $script"
    rc=127
fi

sync
echo "NITRO-GUEST-EXIT=$rc"
poweroff -f
# poweroff -f does not return; if it ever does, panic=-1 + -no-reboot ends QEMU.
exit "$rc"
