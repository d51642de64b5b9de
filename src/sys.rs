//! The few syscalls that no crate we use wraps for us. Every `unsafe` block of peerd lives here.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// One `sendfile(2)` call: copies up to `count` bytes of `file` at `offset` into `socket` inside
/// the kernel. Returns the bytes sent; `WouldBlock` when the (non-blocking) socket is full.
pub fn sendfile(socket: RawFd, file: &impl AsRawFd, offset: u64, count: usize) -> io::Result<usize> {
    let mut off = offset as libc::off_t;
    // SAFETY: both descriptors are open for the whole call (the caller holds them), and `off` is a
    // valid, exclusively borrowed off_t the kernel updates.
    let n = unsafe { libc::sendfile(socket, file.as_raw_fd(), &mut off, count) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Starts asynchronous readahead of a file range, so that a later `sendfile` finds the pages in
/// the page cache instead of blocking the shard on a cold disk read.
pub fn will_need(file: &impl AsRawFd, offset: u64, len: u64) {
    // SAFETY: posix_fadvise only reads its integer arguments; a bad fd yields an error code.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset as libc::off_t, len as libc::off_t, libc::POSIX_FADV_WILLNEED);
    }
}

/// Whether the byte at `offset` is in the page cache: a 1-byte `preadv2(RWF_NOWAIT)` fails with
/// EAGAIN instead of going to the disk. Errors other than EAGAIN count as cached, so that the
/// caller goes on and meets the real error where it can report it.
pub fn is_cached(file: &impl AsRawFd, offset: u64) -> bool {
    let mut byte = 0u8;
    let iov = libc::iovec { iov_base: (&mut byte as *mut u8).cast(), iov_len: 1 };
    // SAFETY: one iovec pointing at a live, exclusively borrowed byte.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
    n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock
}

/// Sets or clears `O_NONBLOCK`, returning the previous setting. io_uring keeps sockets blocking,
/// but `sendfile` must never block a shard, so the socket is switched around each body.
pub fn set_nonblocking(fd: RawFd, nonblocking: bool) -> io::Result<bool> {
    // SAFETY: fcntl with F_GETFL/F_SETFL on an fd we hold has no memory effects.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let was = flags & libc::O_NONBLOCK != 0;
        let new = if nonblocking { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
        if new != flags && libc::fcntl(fd, libc::F_SETFL, new) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(was)
    }
}

/// Sets `TCP_CORK`: while set, the kernel holds partial frames, so that a response head written
/// before a `sendfile` body leaves in the same packets as the body instead of on its own.
pub fn set_cork(socket: RawFd, on: bool) -> io::Result<()> {
    let v: libc::c_int = on.into();
    // SAFETY: setsockopt reads one c_int we own for the length we pass.
    let r = unsafe {
        libc::setsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CPU time used by the calling thread so far.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether this process may create an io_uring instance. Seccomp profiles (containerd 2.x,
/// Docker 25+) and `kernel.io_uring_disabled` make `io_uring_setup` fail with EPERM or ENOSYS.
pub fn io_uring_available() -> Result<(), io::Error> {
    let mut params = [0u8; 120]; // struct io_uring_params, zeroed
                                 // SAFETY: io_uring_setup writes at most sizeof(struct io_uring_params) = 120 bytes into params.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us and is closed once.
    unsafe { libc::close(fd as RawFd) };
    Ok(())
}

/// Raises the soft open-file limit to the hard one: every client, peer and blob is an fd, and
/// the usual soft limit of 1024 would let a few idle clients lock real pulls out.
/// Bytes an unprivileged writer can still put on the filesystem that holds `file`.
pub fn free_bytes(file: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: fstatvfs writes only into the zeroed struct we own; the fd is open for the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read or write exactly one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn sendfile_copies_the_requested_window() {
        let dir = std::env::temp_dir().join(format!("peerd-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::File::create(&path).unwrap().write_all(b"0123456789").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let n = sendfile(server.as_raw_fd(), &file, 3, 4).unwrap();
        assert_eq!(n, 4);
        drop(server);
        let mut got = String::new();
        (&client).read_to_string(&mut got).unwrap();
        assert_eq!(got, "3456");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn cached_pages_are_reported_cached() {
        let path = std::env::temp_dir().join(format!("peerd-cached-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // Just written, so in the page cache.
        assert!(is_cached(&file, 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn nonblocking_toggles_and_reports_previous() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        assert!(!set_nonblocking(fd, true).unwrap());
        assert!(set_nonblocking(fd, false).unwrap());
    }
}
