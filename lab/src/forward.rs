//! A TCP forwarder from inside a network namespace to this process's own:
//! it listens on an address in the namespace (e.g. 127.0.0.1:6443 in a
//! node's) and connects each accepted connection to an address of the
//! namespace the test runs in (e.g. a kube-apiserver on the host's
//! loopback). The listening socket is made in the target namespace by a
//! thread that entered it; connections out are made by threads that never
//! left this one. No traffic leaves either loopback.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::LabError;

/// A running forwarder; stops accepting when dropped.
#[derive(Debug)]
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    listen: SocketAddr,
    netns: std::path::PathBuf,
}

impl Forwarder {
    /// Listens on `listen` inside the network namespace at `netns` and
    /// forwards every connection to `to` (an address of the caller's
    /// namespace).
    pub fn start(netns: &Path, listen: SocketAddr, to: SocketAddr) -> Result<Self, LabError> {
        let listener = crate::netns::run_in(netns, || {
            TcpListener::bind(listen).map_err(|e| LabError::sys("bind", listen, e))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(inside) = conn else { continue };
                std::thread::spawn(move || {
                    if let Ok(outside) = TcpStream::connect(to) {
                        let _ = pipe(inside, outside);
                    }
                });
            }
        });
        Ok(Self {
            stop,
            listen,
            netns: netns.to_owned(),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop (it sees the flag and returns).
        let listen = self.listen;
        let _ = crate::netns::run_in(&self.netns, || {
            TcpStream::connect(listen)
                .map(drop)
                .map_err(|e| LabError::sys("connect", listen, e))
        });
    }
}

/// Copies both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) -> io::Result<()> {
    let (mut ar, mut bw) = (a.try_clone()?, b.try_clone()?);
    let t = std::thread::spawn(move || {
        let _ = io::copy(&mut ar, &mut bw);
        let _ = bw.shutdown(Shutdown::Write);
    });
    let (mut br, mut aw) = (b, a);
    let _ = io::copy(&mut br, &mut aw);
    let _ = aw.shutdown(Shutdown::Write);
    let _ = t.join();
    Ok(())
}
