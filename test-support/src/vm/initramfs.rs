//! The initramfs: busybox, the boot modules, `/init` and the command
//! script, as a `newc` cpio archive.
//!
//! `/init` mounts the host's root (9p, read-only) under a tmpfs overlay at
//! `/newroot`, mounts proc, sysfs, devtmpfs, devpts, a fresh `/run`, cgroup2
//! and bpffs inside it, loads `wireguard` with the host's `modprobe`, then
//! runs the command chrooted there and prints the exit marker.

use std::fmt::Write as _;

/// Writes a `newc` (SVR4, no CRC) cpio archive, the format the kernel
/// unpacks an initramfs from.
#[derive(Debug, Default)]
pub(crate) struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    rdev: (u32, u32),
}

impl Cpio {
    /// A directory (mode 0755).
    pub fn dir(&mut self, path: &str) {
        self.entry(path, 0o040_755, b"");
    }

    /// A regular file with `mode`'s permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, 0o100_000 | mode, data);
    }

    /// A character device node (mode 0600), e.g. `/dev/console` (5, 1): the
    /// kernel opens it as PID 1's stdin, stdout and stderr.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.rdev = (major, minor);
        self.entry(path, 0o020_600, b"");
        self.rdev = (0, 0);
    }

    /// The archive, closed by its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, b"");
        self.buf
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).expect("initramfs file over 4 GiB"),
            0, // dev major
            0, // dev minor
            self.rdev.0,
            self.rdev.1,
            u32::try_from(path.len() + 1).expect("path length"),
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(path.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// Header+name and data are each padded to a multiple of 4 bytes.
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

/// `s` as one POSIX shell word.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Where the command script is copied in the guest's root (on its `/run` tmpfs).
const GUEST_SCRIPT: &str = "/run/meshauth-vm/cmd.sh";

/// The command script, run by the host's `/bin/sh` inside the chroot.
pub(crate) fn command_script(cwd: &str, argv: &[String]) -> String {
    let argv: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    format!(
        "cd {cwd} || exit 125\nexec {argv}\n",
        cwd = quote(cwd),
        argv = argv.join(" ")
    )
}

/// What `/init` needs to know.
#[derive(Debug)]
pub(crate) struct InitParams<'a> {
    /// The boot modules, in load order.
    pub modules: &'a [String],
    /// The command's whole environment.
    pub env: &'a [(String, String)],
    /// Printed before the command starts.
    pub start_marker: &'a str,
    /// Printed as `<exit marker><status>` after it ends.
    pub exit_marker: &'a str,
    /// The 9p mount tag of the host's root.
    pub mount_tag: &'a str,
    /// The 9p message size.
    pub msize: u32,
}

/// The `/init` script (busybox sh, PID 1).
pub(crate) fn init_script(p: &InitParams<'_>) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /host /rw /newroot
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
fail() {{ echo "meshauth-vm init: $*" >&2; poweroff -f; }}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
"#
    );
    for m in p.modules {
        let _ = writeln!(s, "insmod /modules/{m} || fail 'insmod {m}'");
    }
    let _ = write!(
        s,
        r#"mount -t 9p -o trans=virtio,version=9p2000.L,msize={msize},cache=loose,ro {tag} /host || fail "mounting the host's root (9p {tag})"
mount -t tmpfs -o mode=0755 rw /rw && mkdir -p /rw/upper /rw/work || fail 'tmpfs for the overlay'
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || fail 'overlay on the host root'
R=/newroot
mount -t proc proc $R/proc || fail proc
mount -t sysfs sysfs $R/sys || fail sysfs
mount -t devtmpfs devtmpfs $R/dev || fail devtmpfs
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts $R/dev/pts || fail devpts
mount -t tmpfs -o mode=1777 shm $R/dev/shm || fail /dev/shm
ln -sfn /proc/self/fd $R/dev/fd
ln -sfn /proc/self/fd/0 $R/dev/stdin
ln -sfn /proc/self/fd/1 $R/dev/stdout
ln -sfn /proc/self/fd/2 $R/dev/stderr
mount -t tmpfs -o mode=0755 run $R/run || fail /run
mkdir -p $R/run/lock $R/run/meshauth-vm
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || fail cgroup2
mount -t bpf -o mode=0700 bpf $R/sys/fs/bpf || fail bpffs
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
# The kernel runs its module helper in the initramfs root: hand the request
# to the host's modprobe, which knows /lib/modules/$(uname -r).
rm -f /sbin/modprobe
printf '#!/bin/sh\nexec chroot /newroot /sbin/modprobe "$@"\n' > /sbin/modprobe
chmod 0755 /sbin/modprobe
echo /sbin/modprobe > /proc/sys/kernel/modprobe
chroot $R /sbin/modprobe wireguard || fail 'modprobe wireguard (host /sbin/modprobe, kmod)'
[ -d /sys/module/wireguard ] || fail 'wireguard loaded but /sys/module/wireguard is missing'
hostname meshauth-vm
ip link set lo up
cp /cmd.sh $R{script} || fail 'copying the command script'
echo {start}
env -i {env} chroot $R /bin/sh {script} </dev/null
rc=$?
echo
echo {exit}$rc
poweroff -f
"#,
        msize = p.msize,
        tag = p.mount_tag,
        script = GUEST_SCRIPT,
        start = p.start_marker,
        exit = p.exit_marker,
        env = p
            .env
            .iter()
            .map(|(k, v)| quote(&format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(" "),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_header_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        // ino 1, mode 0100755, ..., filesize 3, ..., namesize 5
        let header = std::str::from_utf8(&out[6..110]).unwrap();
        assert_eq!(&header[..16], "00000001000081ED");
        assert_eq!(&header[48..56], "00000003");
        assert_eq!(&header[88..96], "00000005");
        // 110 + "init\0" = 115 → padded to 116; data 3 → 4.
        assert_eq!(&out[110..116], b"init\0\0");
        assert_eq!(&out[116..120], b"abc\0");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(quote("it's a b"), r"'it'\''s a b'");
        assert_eq!(
            command_script("/a b", &["sh".into(), "-c".into(), "echo '$HOME'".into()]),
            "cd '/a b' || exit 125\nexec 'sh' '-c' 'echo '\\''$HOME'\\'''\n"
        );
    }
}
