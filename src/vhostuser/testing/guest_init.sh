#!/bin/sh
# /init (PID 1) of the vhostuser test guest, installed by vhostuser.testing.guest.
#
# Channels:
#   /dev/console (ttyS0)  human log: kernel messages, this script, the test's output
#   /dev/ttyS1            result channel, parsed by the host: only the lines below
#
#   ===VHOSTUSER-RESULT-BEGIN=== <guest uptime in s>
#   <stdout+stderr of /test.sh>
#   ===VHOSTUSER-RESULT-END===          (preceded by one extra newline)
#   ===VHOSTUSER-STATUS=== <exit status of /test.sh>
#
# or, when a module cannot be loaded:
#   ===VHOSTUSER-MODULE-FAILED=== <module file>
#
# The test script runs with cwd /root, stdin /dev/null, PATH of busybox applets.
# The guest powers off afterwards (poweroff -f); a hanging script is ended by the
# host-side timeout.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd
hostname vhostuser-guest

RESULT=/dev/ttyS1
# raw: no \n -> \r\n translation, so the result channel is byte-exact.
stty -F "$RESULT" raw -echo 2>/dev/null

while read -r mod; do
    [ -n "$mod" ] || continue
    if ! insmod "/lib/modules/$mod"; then
        echo "===VHOSTUSER-MODULE-FAILED=== $mod"
        echo "===VHOSTUSER-MODULE-FAILED=== $mod" > "$RESULT"
        poweroff -f
    fi
done < /etc/vhostuser/modules

cd /root
{
    read -r up _ < /proc/uptime
    echo "===VHOSTUSER-RESULT-BEGIN=== $up"
    /bin/sh /test.sh < /dev/null 2>&1
    echo $? > /run/vhostuser-status
    printf '\n===VHOSTUSER-RESULT-END===\n'
} | tee "$RESULT"
# tee's close of ttyS1 waits until the UART has sent everything.
read -r status < /run/vhostuser-status
echo "===VHOSTUSER-STATUS=== $status"
echo "===VHOSTUSER-STATUS=== $status" > "$RESULT"
sync
poweroff -f
