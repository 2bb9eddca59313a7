//! Resuming a layer mount whose FUSE connection outlived the daemon that served it (a holder kept
//! its /dev/fuse descriptor): the kernel never sends a second INIT, so fuser's session is started
//! on one end of a socket pair that is handed a synthetic INIT, and a relay copies requests and
//! replies between the connection and that socket. Requests the dead daemon had read but not
//! answered are sent again by the kernel (FUSE_NOTIFY_RESEND, Linux 6.9+).

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, Shutdown, SockFlag, SockType};

use crate::handles::{OpenRecord, OpenTable};
use crate::mount::{
    connection_alive, keep_request_buffers_lazy, start_session, FuseError, MountHandle,
    MountOptions,
};
use crate::{ContentSource, Index};

/// FUSE opcode of INIT.
const FUSE_INIT: u32 = 26;
/// Notification code that makes the kernel send the requests still awaiting a reply again.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// The protocol version the synthetic INIT announces (fuser answers with its own).
const INIT_MINOR: u32 = 40;
/// `unique` of the synthetic INIT; the kernel's requests never use 0.
const SYNTHETIC_UNIQUE: u64 = 0;
/// Room for any request the kernel sends (it refuses reads into a buffer smaller than its
/// maximum write plus headers; fuser announces 16 MiB).
const REQUEST_BUFFER: usize = (16 << 20) + 4096;
/// Room for any reply (reads of up to 1 MiB and their header) on the relay socket.
const REPLY_BUFFER: usize = 4 << 20;

/// Mounts `index` again on the FUSE connection `connection` that is still mounted at
/// `mountpoint` (device number `dev`), served by `source`. `opts.open_record` is the record the
/// previous daemon kept of the open files. Fails when the connection is gone or the mount point
/// holds something else: then detach it and [`mount`](crate::mount) afresh.
pub fn resume(
    index: Index,
    source: Arc<dyn ContentSource>,
    mountpoint: &Path,
    opts: &MountOptions,
    connection: OwnedFd,
    dev: u64,
) -> Result<MountHandle, FuseError> {
    let span = tracing::info_span!("fuse_resume", mountpoint = %mountpoint.display());
    let _enter = span.enter();
    let failed = |detail: &str| FuseError::Resume {
        path: mountpoint.to_path_buf(),
        detail: detail.to_string(),
    };
    check_resumable(&connection, mountpoint, dev)?;
    keep_request_buffers_lazy();
    let (session_end, relay_end) = relay_sockets().map_err(|e| failed(&e.to_string()))?;
    nix::unistd::write(&relay_end, &synthetic_init())
        .map_err(|e| failed(&format!("cannot hand the session its INIT: {e}")))?;
    let connection = Arc::new(connection);
    let record = opts.open_record.as_deref().and_then(|path| {
        OpenRecord::open(path, index.inode_count() as u64)
            .map_err(|err| tracing::warn!(path = %path.display(), error = %err, "no record of the open files; opens of files the kernel still holds may fail"))
            .ok()
    });
    let table = OpenTable::new(record, Some(&connection));
    let relay = Relay {
        connection: Arc::clone(&connection),
        relay_end: Arc::new(relay_end),
    };
    start_session(
        index,
        source,
        mountpoint.to_path_buf(),
        opts,
        table,
        session_end,
        connection,
        Some(relay),
    )
}

/// Whether `connection` is alive and still the filesystem mounted at `mountpoint` (device
/// number `dev`), so that [`resume`] can serve it.
pub fn check_resumable(connection: &OwnedFd, mountpoint: &Path, dev: u64) -> Result<(), FuseError> {
    let failed = |detail: String| FuseError::Resume {
        path: mountpoint.to_path_buf(),
        detail,
    };
    if !connection_alive(connection) {
        return Err(failed("its FUSE connection is gone".into()));
    }
    match std::fs::metadata(mountpoint) {
        Ok(meta) if meta.dev() == dev => Ok(()),
        Ok(_) => Err(failed("the mount point holds another filesystem".into())),
        Err(err) => Err(failed(format!("cannot stat the mount point: {err}"))),
    }
}

/// A connected pair of message sockets with room for the largest reply.
fn relay_sockets() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    for end in [&a, &b] {
        socket::setsockopt(end, sockopt::SndBufForce, &REPLY_BUFFER)?;
        socket::setsockopt(end, sockopt::RcvBufForce, &REPLY_BUFFER)?;
    }
    Ok((a, b))
}

/// An INIT request as the kernel sends it, offering every capability fuser knows.
fn synthetic_init() -> Vec<u8> {
    let flags = fuser::InitFlags::all().bits();
    let mut init = Vec::with_capacity(104);
    init.extend_from_slice(&104u32.to_ne_bytes()); // len
    init.extend_from_slice(&FUSE_INIT.to_ne_bytes()); // opcode
    init.extend_from_slice(&SYNTHETIC_UNIQUE.to_ne_bytes()); // unique
    init.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    init.extend_from_slice(&[0u8; 12]); // uid, gid, pid
    init.extend_from_slice(&[0u8; 4]); // total_extlen, padding
    init.extend_from_slice(&7u32.to_ne_bytes()); // major
    init.extend_from_slice(&INIT_MINOR.to_ne_bytes()); // minor
    init.extend_from_slice(&(1u32 << 20).to_ne_bytes()); // max_readahead
    init.extend_from_slice(&(flags as u32).to_ne_bytes()); // flags
    init.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes()); // flags2
    init.extend_from_slice(&[0u8; 44]); // unused
    init
}

/// Copies requests from a resumed connection to its session and replies back.
#[derive(Debug)]
pub(crate) struct Relay {
    connection: Arc<OwnedFd>,
    relay_end: Arc<OwnedFd>,
}

impl Relay {
    /// Drops fuser's answer to the synthetic INIT, starts the copying threads and asks the
    /// kernel to send again what the previous daemon left unanswered.
    pub(crate) fn start(&self) -> std::io::Result<()> {
        let mut init_reply = vec![0u8; 4096];
        nix::unistd::read(&*self.relay_end, &mut init_reply)?;
        let (connection, relay_end) = (Arc::clone(&self.connection), Arc::clone(&self.relay_end));
        std::thread::Builder::new()
            .name("fuse-relay-in".into())
            .spawn(move || relay_requests(&connection, &relay_end))?;
        let (connection, relay_end) = (Arc::clone(&self.connection), Arc::clone(&self.relay_end));
        std::thread::Builder::new()
            .name("fuse-relay-out".into())
            .spawn(move || relay_replies(&connection, &relay_end))?;
        let mut resend = Vec::with_capacity(16);
        resend.extend_from_slice(&16u32.to_ne_bytes());
        resend.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
        resend.extend_from_slice(&0u64.to_ne_bytes());
        if let Err(err) = nix::unistd::write(&*self.connection, &resend) {
            tracing::warn!(error = %err, "the kernel cannot resend requests the previous daemon left unanswered (Linux 6.9+ can); processes waiting on them stay blocked");
        }
        Ok(())
    }
}

/// Kernel -> session, until the connection ends; then closes the socket, which ends the session.
fn relay_requests(connection: &OwnedFd, relay_end: &OwnedFd) {
    let mut buf = vec![0u8; REQUEST_BUFFER];
    loop {
        match nix::unistd::read(connection, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(err) = nix::unistd::write(relay_end, &buf[..n]) {
                    tracing::warn!(error = %err, "relaying a FUSE request failed");
                    break;
                }
            }
            Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => continue,
            Err(Errno::ENODEV) => break,
            Err(err) => {
                tracing::warn!(error = %err, "reading the resumed FUSE connection failed");
                break;
            }
        }
    }
    let _ = socket::shutdown(relay_end.as_raw_fd(), Shutdown::Both);
}

/// Session -> kernel, until the socket closes.
fn relay_replies(connection: &OwnedFd, relay_end: &OwnedFd) {
    let mut buf = vec![0u8; REPLY_BUFFER];
    loop {
        match nix::unistd::read(relay_end, &mut buf) {
            Ok(0) => break,
            Ok(n) => match nix::unistd::write(connection, &buf[..n]) {
                // ENOENT: the request was interrupted and is gone.
                Ok(_) | Err(Errno::ENOENT) => {}
                Err(Errno::ENODEV) => break,
                Err(err) => tracing::warn!(error = %err, "relaying a FUSE reply failed"),
            },
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(_) => break,
        }
    }
}
