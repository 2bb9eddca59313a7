//! The FUSE connection holder: a small process that keeps the /dev/fuse descriptor of every layer
//! `serve` mounts, so that running containers keep their filesystems through a crash, a restart
//! or an upgrade of the daemon (the kernel queues their requests meanwhile), and hands them to
//! the next `serve`, which resumes serving them. It exits once it holds nothing and no daemon is
//! connected (unless told to stay, as the sidecar of a DaemonSet does). A holder starting where
//! another one listens takes its connections over and tells it to quit. Protocol: one text
//! message per datagram on a unix SOCK_SEQPACKET socket, with the descriptor attached
//! (SCM_RIGHTS): `hold DEV PATH` + fd, `release PATH`, `list` (answered by `entry DEV PATH` + fd
//! per connection, then `end`), `quit`; other answers are `ok` or `error TEXT`.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

use crate::sync::lock;

/// How long the holder stays up with nothing held and no daemon connected.
const IDLE_EXIT: Duration = Duration::from_secs(10);
/// How long a daemon waits for a holder it started to listen.
const START_WAIT: Duration = Duration::from_secs(5);
/// Largest message (a mount point path and a few words).
const MESSAGE_MAX: usize = 8192;

/// Why talking to the holder failed.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("FUSE holder at {socket}: {detail}")]
    Io { socket: PathBuf, detail: String },
}

/// A connection this daemon held or holds.
#[derive(Debug)]
pub struct HeldConnection {
    /// Device number of the mounted layer.
    pub dev: u64,
    /// The /dev/fuse descriptor.
    pub fd: OwnedFd,
}

/// A daemon's link to its holder.
#[derive(Debug)]
pub struct FuseHolder {
    socket: PathBuf,
    stream: Mutex<OwnedFd>,
}

impl FuseHolder {
    /// Connects to the holder listening at `socket`, starting one (`lazysnap fuse-holder`, this
    /// executable, in its own session so that it outlives the daemon) when none does.
    pub fn connect_or_start(socket: &Path) -> Result<Self, HolderError> {
        if let Ok(stream) = connect_to(socket) {
            return Ok(Self::new(socket, stream));
        }
        let _ = std::fs::remove_file(socket);
        let exe =
            std::env::current_exe().map_err(|e| io_error(socket, "finding this executable", e))?;
        let mut command = std::process::Command::new(exe);
        command
            .arg("fuse-holder")
            .arg("--socket")
            .arg(socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        // SAFETY: setsid is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| io_error(socket, "starting `lazysnap fuse-holder`", e))?;
        let deadline = Instant::now() + START_WAIT;
        loop {
            match connect_to(socket) {
                Ok(stream) => {
                    // Reaped in the background: it lives on its own.
                    std::thread::spawn(move || child.wait());
                    tracing::info!(socket = %socket.display(), "started the FUSE connection holder");
                    return Ok(Self::new(socket, stream));
                }
                Err(err) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    return Err(io_error(
                        socket,
                        "connecting to the holder just started",
                        err,
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn new(socket: &Path, stream: OwnedFd) -> Self {
        FuseHolder {
            socket: socket.to_path_buf(),
            stream: Mutex::new(stream),
        }
    }

    /// Gives the holder the connection `fd` of the layer mounted at `mountpoint` (device `dev`).
    pub fn hold(&self, mountpoint: &Path, dev: u64, fd: BorrowedFd<'_>) -> Result<(), HolderError> {
        let mut message = format!("hold {dev} ").into_bytes();
        message.extend_from_slice(mountpoint.as_os_str().as_bytes());
        self.call(&message, Some(fd))
    }

    /// Tells the holder to let go of the connection of `mountpoint` (it is being unmounted).
    pub fn release(&self, mountpoint: &Path) -> Result<(), HolderError> {
        let mut message = b"release ".to_vec();
        message.extend_from_slice(mountpoint.as_os_str().as_bytes());
        self.call(&message, None)
    }

    /// Every connection the holder keeps, by mount point (the holder keeps them too).
    pub fn list(&self) -> Result<HashMap<PathBuf, HeldConnection>, HolderError> {
        let stream = lock(&self.stream);
        send(&stream, b"list", None).map_err(|e| io_error(&self.socket, "list", e))?;
        let mut held = HashMap::new();
        loop {
            let (message, fd) = receive(&stream).map_err(|e| io_error(&self.socket, "list", e))?;
            if message == b"end" {
                return Ok(held);
            }
            let parsed = parse_dev_path(&message, b"entry ");
            match (parsed, fd) {
                (Some((dev, path)), Some(fd)) => {
                    held.insert(path, HeldConnection { dev, fd });
                }
                _ => {
                    return Err(HolderError::Io {
                        socket: self.socket.clone(),
                        detail: format!(
                            "unexpected answer to list: {}",
                            String::from_utf8_lossy(&message)
                        ),
                    })
                }
            }
        }
    }

    fn call(&self, message: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), HolderError> {
        let stream = lock(&self.stream);
        let what = String::from_utf8_lossy(message.split(|b| *b == b' ').next().unwrap_or(b""))
            .into_owned();
        send(&stream, message, fd).map_err(|e| io_error(&self.socket, &what, e))?;
        let (answer, _) = receive(&stream).map_err(|e| io_error(&self.socket, &what, e))?;
        if answer == b"ok" {
            Ok(())
        } else {
            Err(HolderError::Io {
                socket: self.socket.clone(),
                detail: format!("{what}: {}", String::from_utf8_lossy(&answer)),
            })
        }
    }
}

fn io_error(socket: &Path, what: &str, err: impl std::fmt::Display) -> HolderError {
    HolderError::Io {
        socket: socket.to_path_buf(),
        detail: format!("{what}: {err}"),
    }
}

/// A unix socket whose messages keep their boundaries (one request or answer per datagram).
fn message_socket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn connect_to(path: &Path) -> nix::Result<OwnedFd> {
    let fd = message_socket()?;
    let (_dir, address) = socket_address(path)?;
    connect(fd.as_raw_fd(), &address)?;
    Ok(fd)
}

fn send(stream: &OwnedFd, message: &[u8], fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    let raw: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(message)],
        cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// One message and the descriptor attached to it. An empty message means the peer left.
fn receive(stream: &OwnedFd) -> nix::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MESSAGE_MAX];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                // SAFETY: the kernel just installed this descriptor for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    let len = msg.bytes;
    buf.truncate(len);
    Ok((buf, fd))
}

fn parse_dev_path(message: &[u8], prefix: &[u8]) -> Option<(u64, PathBuf)> {
    let rest = message.strip_prefix(prefix)?;
    let space = rest.iter().position(|b| *b == b' ')?;
    let dev = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
    let path = std::ffi::OsStr::from_bytes(&rest[space + 1..]);
    Some((dev, PathBuf::from(path)))
}

/// Runs the holder on `socket` until it holds nothing and no daemon is connected for a while
/// (with `stay`, until killed).
pub fn run_holder(socket: &Path, stay: bool) -> Result<(), HolderError> {
    let fail = |what: &str, e: nix::Error| io_error(socket, what, e);
    let mut held: Vec<(PathBuf, HeldConnection)> = Vec::new();
    // Another holder there: take its connections, then let it go.
    if let Ok(stream) = connect_to(socket) {
        let previous = FuseHolder::new(socket, stream);
        let taken = previous.list()?;
        tracing::info!(
            connections = taken.len(),
            "taking over from the holder already running"
        );
        held.extend(taken);
        previous.call(b"quit", None)?;
    }
    let listener = socket_listening(socket).map_err(|e| fail("listening", e))?;
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut idle_since = Instant::now();
    loop {
        let revents: Vec<PollFlags> = {
            let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                clients
                    .iter()
                    .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
            );
            fds.extend(
                held.iter()
                    .map(|(_, h)| PollFd::new(h.fd.as_fd(), PollFlags::empty())),
            );
            match poll(&mut fds, PollTimeout::from(1000u16)) {
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(fail("poll", e)),
            }
            fds.iter()
                .map(|fd| fd.revents().unwrap_or(PollFlags::empty()))
                .collect()
        };
        let (client_events, held_events) = revents[1..].split_at(clients.len());
        // Connections whose filesystem is gone (unmounted) report an error: let them go.
        let gone: Vec<usize> = held_events
            .iter()
            .enumerate()
            .filter(|(_, ev)| ev.intersects(PollFlags::POLLERR | PollFlags::POLLHUP))
            .map(|(i, _)| i)
            .collect();
        for i in gone.into_iter().rev() {
            let (path, _) = held.remove(i);
            tracing::debug!(mountpoint = %path.display(), "held FUSE connection ended");
        }
        let mut left = Vec::new();
        for (i, ev) in client_events.iter().enumerate() {
            if ev.is_empty() {
                continue;
            }
            let stays = match receive(&clients[i]) {
                Ok((message, _)) if message.is_empty() => false,
                Ok((message, _)) if message == b"quit" => {
                    // Another holder took the connections over and owns the socket now.
                    let _ = send(&clients[i], b"ok", None);
                    return Ok(());
                }
                Ok((message, fd)) => serve_request(&clients[i], &message, fd, &mut held).is_ok(),
                Err(_) => false,
            };
            if !stays {
                left.push(i);
            }
        }
        for i in left.into_iter().rev() {
            clients.remove(i);
        }
        if revents[0].contains(PollFlags::POLLIN) {
            match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor we own.
                Ok(raw) => clients.push(unsafe { OwnedFd::from_raw_fd(raw) }),
                Err(e) => tracing::warn!(error = %e, "accepting a daemon failed"),
            }
        }
        if stay || !held.is_empty() || !clients.is_empty() {
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= IDLE_EXIT {
            let _ = std::fs::remove_file(socket);
            return Ok(());
        }
    }
}

/// The address of the socket at `path`. A path too long for a socket address (108 bytes) is
/// reached through its directory, opened and named by `/proc/self/fd` (keep the descriptor
/// returned while the address is used).
fn socket_address(path: &Path) -> nix::Result<(Option<OwnedFd>, UnixAddr)> {
    const ROOM: usize = 100;
    if path.as_os_str().len() < ROOM {
        return Ok((None, UnixAddr::new(path)?));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(nix::errno::Errno::ENAMETOOLONG);
    };
    let dir = nix::fcntl::open(
        dir,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    Ok((Some(dir), UnixAddr::new(&short)?))
}

fn socket_listening(path: &Path) -> nix::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = message_socket()?;
    let (_dir, address) = socket_address(path)?;
    bind(fd.as_raw_fd(), &address)?;
    listen(&fd, Backlog::new(16)?)?;
    Ok(fd)
}

fn serve_request(
    client: &OwnedFd,
    message: &[u8],
    fd: Option<OwnedFd>,
    held: &mut Vec<(PathBuf, HeldConnection)>,
) -> nix::Result<()> {
    if message == b"list" {
        for (path, connection) in held.iter() {
            let mut entry = format!("entry {} ", connection.dev).into_bytes();
            entry.extend_from_slice(path.as_os_str().as_bytes());
            send(client, &entry, Some(connection.fd.as_fd()))?;
        }
        return send(client, b"end", None);
    }
    if let Some(rest) = message.strip_prefix(b"release ") {
        let path = Path::new(std::ffi::OsStr::from_bytes(rest));
        held.retain(|(p, _)| p != path);
        return send(client, b"ok", None);
    }
    match (parse_dev_path(message, b"hold "), fd) {
        (Some((dev, path)), Some(fd)) => {
            held.retain(|(p, _)| *p != path);
            held.push((path, HeldConnection { dev, fd }));
            send(client, b"ok", None)
        }
        _ => send(
            client,
            b"error: expected `hold DEV PATH` with a descriptor, `release PATH` or `list`",
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_path_longer_than_an_address_holds_is_reached_through_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a-directory-name-long-enough".repeat(4));
        std::fs::create_dir_all(&deep).unwrap();
        let socket = deep.join("fuse-holder.sock");
        assert!(socket.as_os_str().len() > 108);
        let listener = socket_listening(&socket).unwrap();
        assert!(socket.exists(), "the socket is bound at its real path");
        let client = connect_to(&socket).unwrap();
        send(&client, b"hello", None).unwrap();
        let accepted = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).unwrap();
        nix::unistd::close(accepted).unwrap();
    }

    #[test]
    fn the_holder_keeps_descriptors_for_the_next_daemon_and_lets_released_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("holder.sock");
        let server_socket = socket.clone();
        let first_holder = std::thread::spawn(move || run_holder(&server_socket, false));
        let deadline = Instant::now() + START_WAIT;
        let stream = loop {
            match connect_to(&socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("holder not listening: {e}"),
            }
        };
        let first = FuseHolder::new(&socket, stream);
        let (kept, _kept_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let (released, _released_peer) = std::os::unix::net::UnixStream::pair().unwrap();
        first.hold(Path::new("/mnt/a b"), 42, kept.as_fd()).unwrap();
        first
            .hold(Path::new("/mnt/c"), 7, released.as_fd())
            .unwrap();
        first.release(Path::new("/mnt/c")).unwrap();
        drop(first);

        let second = FuseHolder::new(&socket, connect_to(&socket).unwrap());
        let held = second.list().unwrap();
        assert_eq!(held.len(), 1);
        let entry = &held[Path::new("/mnt/a b")];
        assert_eq!(entry.dev, 42);
        let ours = nix::sys::stat::fstat(&kept).unwrap();
        let theirs = nix::sys::stat::fstat(&entry.fd).unwrap();
        assert_eq!((ours.st_dev, ours.st_ino), (theirs.st_dev, theirs.st_ino));
        drop(second);

        // A holder started on the same socket (a DaemonSet's sidecar) takes the connection over
        // and the first one quits.
        let takeover_socket = socket.clone();
        std::thread::spawn(move || run_holder(&takeover_socket, true));
        let deadline = Instant::now() + START_WAIT;
        while !first_holder.is_finished() {
            assert!(Instant::now() < deadline, "the first holder did not quit");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(first_holder.join().unwrap().is_ok());
        let third = loop {
            match connect_to(&socket) {
                Ok(stream) => break FuseHolder::new(&socket, stream),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("the new holder is not listening: {e}"),
            }
        };
        assert!(third.list().unwrap().contains_key(Path::new("/mnt/a b")));
    }
}
