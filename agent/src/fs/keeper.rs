//! Keeping FUSE connections alive while the agent restarts.
//!
//! A FUSE mount serves as long as some process holds its /dev/fuse descriptor. When the agent
//! exits, crashes or is upgraded, the kernel would abort the connection and every container
//! reading a lazy layer would get ENOTCONN. `imgstream fuse-keeper` is a small process that
//! holds a duplicate of each lazy layer's descriptor, handed over on a unix socket
//! (SCM_RIGHTS) and keyed by mount point. A restarted agent takes the descriptors back and
//! serves the same mounts again: inode numbers come from the layer's TOC, so they name the
//! same files, and the only state of opens (which are in passthrough mode) is in a ledger the
//! agents keep next to the mount point, current however the last one ended
//! ([`crate::fs::passthrough::ledger`]). It then asks the
//! kernel to queue again the requests the old agent had read but not answered
//! (`FUSE_NOTIFY_RESEND`, Linux 6.9), so a read that was in flight when the agent died is
//! answered by the new one instead of hanging. Requests made while no agent runs wait in the
//! kernel's queue.
//!
//! A connection is served again only by a tree with the same inode layout (see
//! [`crate::fs::tree::Tree::layout`]): the layout's digest is kept with the descriptor, and an
//! agent whose tree differs (its tree building changed, or the layer's TOC did) mounts the
//! layer afresh instead of answering the kernel's cached inode numbers with other files.
//!
//! The protocol: SOCK_SEQPACKET messages, `PUT <key>[\n<layout>]` with one descriptor
//! (answered `OK`), `DEL <key>` (`OK`), `GET` (answered with `FD <key>[\n<layout>]` plus a
//! descriptor per entry, then `END`). The socket is created mode 0600, in a directory of
//! its own (0700 when the keeper makes it). The keeper needs no privilege: it holds
//! descriptors and answers on a socket, so it runs with every capability dropped.

use std::{
    collections::BTreeMap,
    io,
    mem::{size_of, zeroed},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{oci::digest::Digest, shutdown::Shutdown};

/// Longest message: a key is a mount point path.
const MAX_MESSAGE: usize = 4096 + 4;
/// Descriptors one keeper holds at most (one per lazy layer).
const MAX_HELD: usize = 65_536;
/// How long the agent waits for the keeper's answer, and the keeper for a client to take
/// one.
const TIMEOUT: Duration = Duration::from_secs(5);
/// A client connection idle this long is closed by the keeper (the agent reconnects).
const IDLE: Duration = Duration::from_secs(60);

/// Sets `sock`'s receive and send timeouts.
fn set_timeouts(sock: BorrowedFd<'_>, recv: Duration, send: Duration) -> io::Result<()> {
    for (opt, after) in [(libc::SO_RCVTIMEO, recv), (libc::SO_SNDTIMEO, send)] {
        let timeout = libc::timeval {
            // `as _`: the field types differ by target (and musl deprecates their aliases).
            tv_sec: after.as_secs() as _,
            tv_usec: after.subsec_micros() as _,
        };
        // SAFETY: a timeval option of the right size on a socket we hold.
        check(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = check(unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)
    })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain integers and bytes; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path {} is too long", path.display()),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok((addr, size_of::<libc::sockaddr_un>() as libc::socklen_t))
}

/// Sends one message, with `pass` attached when given.
fn send(sock: BorrowedFd<'_>, msg: &[u8], pass: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    // Room for one descriptor's control message, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(pass) = pass {
        hdr.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as _;
        // SAFETY: msg_control points at `control`, which is large enough for one cmsghdr and
        // an int (checked by CMSG_SPACE above being at most 32 bytes on every Linux ABI).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(
                libc::CMSG_DATA(cmsg).cast::<libc::c_int>(),
                pass.as_raw_fd(),
            );
        }
    }
    // SAFETY: hdr points at live buffers for the duration of the call.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message (empty at end of stream) and the descriptor attached to it, if any.
fn recv(sock: BorrowedFd<'_>) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as in `send`.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: hdr points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control; the CMSG_* walk stays within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    if hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or descriptors truncated",
        ));
    }
    buf.truncate(n as usize);
    // More than one descriptor is a protocol error: the extras are closed here.
    Ok((buf, fds.into_iter().next()))
}

/// Runs the keeper on `socket` until `shutdown` is triggered. Descriptors it holds are
/// closed when it exits: the mounts they serve end unless an agent still serves them.
pub fn run(socket: &Path, shutdown: &Shutdown) -> io::Result<()> {
    // The socket's directory is the keeper's: made 0700 if missing (an existing one, which
    // an operator chose, keeps its mode).
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::private::create_dir(dir)?;
    }
    let listener = seqpacket()?;
    let _ = std::fs::remove_file(socket);
    let (addr, len) = address(socket)?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    check(unsafe {
        libc::bind(
            listener.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    })?;
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    // SAFETY: listen(2) on our socket.
    check(unsafe { libc::listen(listener.as_raw_fd(), 16) })?;
    tracing::info!(socket = %socket.display(), "FUSE keeper listening");
    let held: Arc<Mutex<Held>> = Arc::default();
    while !shutdown.is_triggered() {
        let mut poll = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, valid for the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 200) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: accept4(2) on our listening socket; no address wanted.
        let conn = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor from accept4.
        let conn = unsafe { OwnedFd::from_raw_fd(conn) };
        // A client that stops reading (or never writes) costs its own thread a timeout, and
        // nobody else anything.
        if let Err(err) = set_timeouts(conn.as_fd(), IDLE, TIMEOUT) {
            tracing::warn!(%err, "keeper connection refused: no timeouts");
            continue;
        }
        let held = held.clone();
        let spawned = std::thread::Builder::new()
            .name("keeper-conn".into())
            .spawn(move || {
                if let Err(err) = serve_conn(conn.as_fd(), &held) {
                    tracing::debug!(%err, "keeper connection ended");
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "keeper connection refused: no thread");
        }
    }
    let _ = std::fs::remove_file(socket);
    let count = crate::sync::lock(&held).len();
    tracing::info!(held = count, "FUSE keeper stopping");
    Ok(())
}

/// What a keeper holds: by key, a descriptor and the layout digest it was put with ("" for
/// none).
type Held = BTreeMap<String, (OwnedFd, String)>;

fn serve_conn(conn: BorrowedFd<'_>, held: &Mutex<Held>) -> io::Result<()> {
    loop {
        let (msg, fd) = recv(conn)?;
        if msg.is_empty() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&msg);
        let (verb, rest) = text.split_once(' ').unwrap_or((&text, ""));
        let (key, layout) = rest.split_once('\n').unwrap_or((rest, ""));
        let mut held = crate::sync::lock(held);
        match (verb, fd) {
            ("PUT", Some(fd)) if !key.is_empty() => {
                if held.len() >= MAX_HELD && !held.contains_key(key) {
                    drop(held);
                    send(conn, b"FULL", None)?;
                    continue;
                }
                tracing::info!(key, layout, "holding a FUSE connection");
                held.insert(key.to_string(), (fd, layout.to_string()));
                drop(held);
                send(conn, b"OK", None)?;
            }
            ("DEL", None) => {
                if held.remove(key).is_some() {
                    tracing::info!(key, "released a FUSE connection");
                }
                drop(held);
                send(conn, b"OK", None)?;
            }
            ("GET", None) => {
                // Duplicates, sent without the lock: a client slow to read holds up nobody.
                let copies: Vec<(String, OwnedFd)> = held
                    .iter()
                    .filter_map(|(key, (fd, layout))| {
                        let name = match layout.as_str() {
                            "" => format!("FD {key}"),
                            layout => format!("FD {key}\n{layout}"),
                        };
                        Some((name, fd.try_clone().ok()?))
                    })
                    .collect();
                drop(held);
                for (name, fd) in &copies {
                    send(conn, name.as_bytes(), Some(fd.as_fd()))?;
                }
                send(conn, b"END", None)?;
            }
            _ => {
                drop(held);
                send(conn, b"ERR", None)?;
            }
        }
    }
}

/// A connection a keeper held, as the agent gets it back.
#[derive(Debug)]
pub struct Kept {
    pub fd: OwnedFd,
    /// The inode layout it was serving; `None` from an agent that did not say (it is then
    /// served again by nobody: the layout cannot be checked).
    pub layout: Option<Digest>,
}

/// The agent's side: a connection to a keeper.
#[derive(Debug)]
pub struct Keeper {
    socket: PathBuf,
    conn: Mutex<Option<OwnedFd>>,
}

impl Keeper {
    /// A keeper at `socket`; connects on first use (and again after an error), so a keeper
    /// that starts after the agent, or restarts, is found.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            conn: Mutex::new(None),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> io::Result<OwnedFd> {
        let sock = seqpacket()?;
        let (addr, len) = address(&self.socket)?;
        // SAFETY: addr is a valid sockaddr_un of `len` bytes.
        check(unsafe {
            libc::connect(
                sock.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.socket.display())))?;
        set_timeouts(sock.as_fd(), TIMEOUT, TIMEOUT)?;
        Ok(sock)
    }

    /// Runs one exchange on the connection, reconnecting once if the keeper went away.
    fn exchange<T>(&self, f: impl Fn(BorrowedFd<'_>) -> io::Result<T>) -> io::Result<T> {
        let mut conn = crate::sync::lock(&self.conn);
        for attempt in 0..2 {
            if conn.is_none() {
                *conn = Some(self.connect()?);
            }
            let sock = conn.as_ref().expect("connected above");
            match f(sock.as_fd()) {
                Ok(v) => return Ok(v),
                Err(err) if attempt == 0 => {
                    tracing::debug!(%err, "keeper connection lost; reconnecting");
                    *conn = None;
                }
                Err(err) => {
                    *conn = None;
                    return Err(err);
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    /// Hands the keeper a duplicate of `fd` under `key` (replacing one it had), with the
    /// digest of the inode layout it serves.
    pub fn put(&self, key: &str, layout: &Digest, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.exchange(|sock| {
            send(sock, format!("PUT {key}\n{layout}").as_bytes(), Some(fd))?;
            expect_ok(sock)
        })
    }

    /// Tells the keeper to close what it holds under `key`.
    pub fn del(&self, key: &str) -> io::Result<()> {
        self.exchange(|sock| {
            send(sock, format!("DEL {key}").as_bytes(), None)?;
            expect_ok(sock)
        })
    }

    /// Duplicates of everything the keeper holds, by key (it keeps holding them).
    pub fn get(&self) -> io::Result<BTreeMap<String, Kept>> {
        self.exchange(|sock| {
            send(sock, b"GET", None)?;
            let mut out = BTreeMap::new();
            loop {
                let (msg, fd) = recv(sock)?;
                match (msg.strip_prefix(b"FD "), fd) {
                    (Some(name), Some(fd)) => {
                        let name = String::from_utf8_lossy(name);
                        let (key, layout) = match name.split_once('\n') {
                            Some((key, layout)) => (key, layout.parse().ok()),
                            None => (name.as_ref(), None),
                        };
                        out.insert(key.to_string(), Kept { fd, layout });
                    }
                    _ if msg == b"END" => return Ok(out),
                    _ => return Err(protocol(&msg)),
                }
            }
        })
    }
}

fn protocol(msg: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("keeper answered {:?}", String::from_utf8_lossy(msg)),
    )
}

fn expect_ok(sock: BorrowedFd<'_>) -> io::Result<()> {
    let (msg, _) = recv(sock)?;
    if msg == b"OK" {
        Ok(())
    } else {
        Err(protocol(&msg))
    }
}

/// Whether a FUSE mount sits at `path` (in /proc/self/mountinfo, fstype `fuse*`): after an
/// agent died, its mounts are still there while a keeper holds their connections.
pub fn is_fuse_mount(path: &Path) -> bool {
    crate::mountinfo::read().is_ok_and(|info| {
        crate::mountinfo::mounts(&info)
            .any(|(mount_point, fstype)| mount_point == path && fstype.starts_with("fuse"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Server = std::thread::JoinHandle<io::Result<()>>;

    /// A keeper in its own thread on a socket in a fresh directory `name`, listening.
    fn keeper(name: &str) -> (PathBuf, PathBuf, Shutdown, Server) {
        let dir = std::env::temp_dir().join(format!("imgstream-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("keeper.sock");
        let stop = Shutdown::new();
        let server = {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || run(&socket, &stop))
        };
        while !socket.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        (dir, socket, stop, server)
    }

    #[test]
    fn descriptors_survive_the_client() {
        let (dir, socket, stop, server) = keeper("keeper");
        // A pipe's write end, handed over and dropped here: the keeper keeps it open.
        let (r, w) = {
            let mut fds = [0; 2];
            // SAFETY: pipe2 fills two descriptors.
            check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }).unwrap();
            // SAFETY: fresh descriptors.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        {
            let client = Keeper::new(&socket);
            client.put("/mnt/a", &Digest::of(b"a"), w.as_fd()).unwrap();
            client.put("/mnt/b", &Digest::of(b"b"), r.as_fd()).unwrap();
            client.del("/mnt/b").unwrap();
        }
        drop(w);
        let again = Keeper::new(&socket);
        let held = again.get().unwrap();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["/mnt/a"]);
        assert_eq!(
            held["/mnt/a"].layout,
            Some(Digest::of(b"a")),
            "the layout came back"
        );
        // The write end we get back is the same pipe.
        let mut w = std::fs::File::from(held["/mnt/a"].fd.try_clone().unwrap());
        std::io::Write::write_all(&mut w, b"hi\n").unwrap();
        let mut buf = [0u8; 3];
        std::io::Read::read_exact(&mut std::fs::File::from(r), &mut buf).unwrap();
        assert_eq!(&buf, b"hi\n");
        // Garbage gets an error answer, not a dead keeper.
        let sock = again.connect().unwrap();
        send(sock.as_fd(), b"PUT", None).unwrap();
        assert_eq!(recv(sock.as_fd()).unwrap().0, b"ERR");
        assert_eq!(again.get().unwrap().len(), 1);
        stop.trigger();
        server.join().unwrap().unwrap();
        assert!(!socket.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_that_stops_reading_does_not_wedge_the_keeper() {
        let (dir, socket, stop, server) = keeper("keeper-stuck");
        let null = std::fs::File::open("/dev/null").expect("it opens");
        let agent = Keeper::new(&socket);
        // More answers than a connection queues (net.unix.max_dgram_qlen is 10 or so).
        for i in 0..64 {
            agent
                .put(&format!("/mnt/{i}"), &Digest::of(b"x"), null.as_fd())
                .expect("the keeper takes it");
        }
        // A client asks for everything and never reads the answers.
        let stuck = agent.connect().expect("the keeper accepts");
        send(stuck.as_fd(), b"GET", None).expect("the keeper reads it");
        std::thread::sleep(Duration::from_millis(300));
        // Everyone else is still answered.
        let other = Keeper::new(&socket);
        other
            .put("/mnt/late", &Digest::of(b"x"), null.as_fd())
            .expect("the keeper takes it");
        assert_eq!(other.get().expect("the keeper answers").len(), 65);
        drop(stuck);
        stop.trigger();
        server
            .join()
            .expect("the thread ends without a panic")
            .expect("the keeper ran without an error");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
