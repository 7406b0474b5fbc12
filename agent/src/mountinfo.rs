//! `/proc/self/mountinfo`, read the one way the agent needs: mount points and their
//! filesystem types.

use std::path::PathBuf;

/// Every mount in `mountinfo` text as (mount point, filesystem type), in order. Lines that do
/// not have the fields are skipped.
pub fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> ..."
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        Some((PathBuf::from(unescape_octal(mount_point)), fstype))
    })
}

/// The device number (`makedev(major, minor)`) of what is mounted at `mount_point` in
/// `mountinfo` text (the last mount there: the one on top). For a FUSE mount it names the
/// connection.
pub fn device(mountinfo: &str, mount_point: &std::path::Path) -> Option<u64> {
    mountinfo
        .lines()
        .rev()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let device = fields.nth(2)?;
            let at = fields.nth(1)?;
            (std::path::Path::new(&unescape_octal(at)) == mount_point).then_some(device)
        })
        .next()
        .and_then(|device| {
            let (major, minor) = device.split_once(':')?;
            Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
        })
}

/// The mounts of this process's namespace, as [`mounts`] gives them.
pub fn read() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped_and_bad_lines_skipped() {
        let info = "\
36 35 0:30 / /var/lib/a\\040b rw - fuse.imgstream imgstream ro
garbage
37 35 0:31 / /tail\\04 rw shared:1 - tmpfs tmpfs rw";
        let got: Vec<(PathBuf, &str)> = mounts(info).collect();
        assert_eq!(
            got,
            [
                (PathBuf::from("/var/lib/a b"), "fuse.imgstream"),
                (PathBuf::from("/tail\\04"), "tmpfs"),
            ]
        );
    }

    #[test]
    fn the_device_is_the_top_mounts_at_that_point() {
        let info = "\
36 35 0:30 / /var/lib/a\\040b rw - fuse.imgstream imgstream ro
40 36 0:77 / /var/lib/a\\040b rw - fuse.imgstream imgstream ro
garbage
37 35 259:1 / /tail rw shared:1 - ext4 /dev/x rw";
        let at = |p: &str| device(info, std::path::Path::new(p));
        assert_eq!(at("/var/lib/a b"), Some(libc::makedev(0, 77)));
        assert_eq!(at("/tail"), Some(libc::makedev(259, 1)));
        assert_eq!(at("/nowhere"), None);
    }
}
