//! Zero-copy blob bodies: `sendfile(2)` from the content store to the client socket, driven by
//! socket readiness so that a slow client never blocks the shard.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use monoio::net::TcpStream;

use crate::sys;

/// Bytes per `sendfile` call; also the readahead window.
const CHUNK: u64 = 2 << 20;
/// How long to wait between checks for a cold chunk to arrive in the page cache, and how many
/// checks before sending anyway (a disk slower than that would stall either way).
const COLD_WAIT: std::time::Duration = std::time::Duration::from_micros(500);
const COLD_WAIT_LIMIT: u32 = 2000;
/// A shard yields to its other connections after this many bytes of one body.
const YIELD_EVERY: u64 = 16 << 20;

/// Sends `len` bytes of `file` from `offset`. Returns the bytes sent before any error.
pub async fn send_file(stream: &TcpStream, file: &File, offset: u64, len: u64) -> (u64, io::Result<()>) {
    let fd = stream.as_raw_fd();
    let was_nonblocking = match sys::set_nonblocking(fd, true) {
        Ok(w) => w,
        Err(e) => return (0, Err(e)),
    };
    let mut sent = 0u64;
    let mut since_yield = 0u64;
    let mut checked_until = offset;
    let res = loop {
        if sent == len {
            break Ok(());
        }
        let pos = offset + sent;
        let want = (len - sent).min(CHUNK) as usize;
        if pos >= checked_until {
            // Keep the page cache one chunk ahead, but only ask for it when it is missing: on a
            // warm cache the check is one cheap syscall, while readahead would walk the pages.
            let next_last = (pos + 2 * CHUNK).min(offset + len) - 1;
            if !sys::is_cached(file, next_last) {
                sys::will_need(file, pos, 2 * CHUNK);
            }
            // sendfile on pages that are not cached would block the whole shard on the disk:
            // wait (yielding to the other connections) until readahead has brought them in.
            let mut waits = 0;
            while waits < COLD_WAIT_LIMIT && !sys::is_cached(file, pos + want as u64 - 1) {
                waits += 1;
                monoio::time::sleep(COLD_WAIT).await;
            }
            checked_until = pos + want as u64;
        }
        match sys::sendfile(fd, file, pos, want) {
            Ok(0) => break Err(io::Error::new(io::ErrorKind::UnexpectedEof, "blob shrank while being sent")),
            Ok(n) => {
                sent += n as u64;
                since_yield += n as u64;
                if since_yield >= YIELD_EVERY {
                    since_yield = 0;
                    YieldNow(false).await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = stream.writable(false).await {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    if !was_nonblocking {
        // io_uring ops on this socket expect it blocking again.
        let _ = sys::set_nonblocking(fd, false);
    }
    (sent, res)
}

/// Lets the shard's other tasks run once.
pub struct YieldNow(pub bool);

impl Future for YieldNow {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}
