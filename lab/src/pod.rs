//! `meshauth lab-pod`: a pod's workload speaking a line protocol on
//! stdin/stdout, one answer line per command line. Every answer starts with
//! `ok` or `fail <reason>`. Durations are in nanoseconds, timeouts in ms;
//! hosts are IP addresses.
//!
//! ```text
//! hello                               -> ok <pid>
//! serve PORT                          TCP and UDP echo on [::]:PORT      -> ok
//! stats PORT                          -> ok <tcp connections accepted> <udp datagrams>
//! connect HOST PORT T                 connect + one echo round trip     -> ok <ns>
//! retry HOST PORT DEADLINE ATTEMPT INTERVAL
//!                                     connect + echo attempts (each ATTEMPT ms at
//!                                     most, one per INTERVAL ms) until DEADLINE ms
//!                                     -> ok <failed attempts> <ns to success>
//!                                     |  fail <failed attempts> <last error>
//! udp HOST PORT T                     one datagram round trip           -> ok <ns>
//! send HOST PORT T TEXT               connect, send TEXT, wait for its echo -> ok <ns>
//! bulk HOST PORT BYTES T              send BYTES on one connection while reading
//!                                     their echo back                   -> ok <ns>
//! rr tcp|udp HOST PORT N T            N round trips on one connection   -> ok <ns> <ns> ...
//! open ID HOST PORT T                 a kept connection                 -> ok <ns>
//! ping ID T                           one round trip on it              -> ok <ns>
//! close ID                            -> ok
//! stream ID HOST PORT INTERVAL T      a round trip every INTERVAL ms on one kept
//!                                     connection, in the background     -> ok
//! stream-stats ID                     -> ok <ok> <failed> [<last error>]
//! stream-stop ID                      -> ok <ok> <failed> [<last error>]
//! quit                                -> ok, then exits
//! ```

use std::collections::HashMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs the workload on stdin/stdout until `quit` or end of input.
pub fn run_stdio() -> std::io::Result<()> {
    let mut pod = Workload::default();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let (answer, quit) = pod.handle(&line);
        writeln!(out, "{answer}")?;
        out.flush()?;
        if quit {
            break;
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Counters {
    tcp: AtomicU64,
    udp: AtomicU64,
}

#[derive(Debug, Default)]
struct StreamState {
    ok: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<String>,
    stop: AtomicBool,
}

#[derive(Debug)]
struct Stream {
    state: Arc<StreamState>,
    thread: std::thread::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Workload {
    served: HashMap<u16, Arc<Counters>>,
    conns: HashMap<String, (TcpStream, u64)>,
    streams: HashMap<String, Stream>,
}

type Answer = Result<String, String>;

fn arg<T: std::str::FromStr>(w: &[&str], i: usize, what: &str) -> Result<T, String> {
    let s = w.get(i).ok_or_else(|| format!("missing {what}"))?;
    s.parse().map_err(|_| format!("bad {what} {s:?}"))
}

fn ms(w: &[&str], i: usize, what: &str) -> Result<Duration, String> {
    arg::<u64>(w, i, what).map(Duration::from_millis)
}

fn target(w: &[&str], i: usize) -> Result<SocketAddr, String> {
    Ok(SocketAddr::new(
        arg::<IpAddr>(w, i, "host")?,
        arg(w, i + 1, "port")?,
    ))
}

impl Workload {
    fn handle(&mut self, line: &str) -> (String, bool) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let quit = w[0] == "quit";
        let answer = match self.dispatch(&w) {
            Ok(s) if s.is_empty() => "ok".to_string(),
            Ok(s) => format!("ok {s}"),
            Err(e) => format!("fail {}", e.replace('\n', " ")),
        };
        (answer, quit)
    }

    fn dispatch(&mut self, w: &[&str]) -> Answer {
        match w[0] {
            "serve" => self.serve(arg(w, 1, "port")?),
            "stats" => {
                let port: u16 = arg(w, 1, "port")?;
                let c = self
                    .served
                    .get(&port)
                    .ok_or(format!("not serving {port}"))?;
                Ok(format!(
                    "{} {}",
                    c.tcp.load(Ordering::Relaxed),
                    c.udp.load(Ordering::Relaxed)
                ))
            }
            "connect" => {
                let start = Instant::now();
                let (mut s, _) = connect(target(w, 1)?, ms(w, 3, "timeout")?)?;
                round_trip(&mut s, 0, start + ms(w, 3, "timeout")?)?;
                Ok(start.elapsed().as_nanos().to_string())
            }
            "send" => {
                let start = Instant::now();
                let deadline = start + ms(w, 3, "timeout")?;
                let text = w
                    .get(4..)
                    .filter(|t| !t.is_empty())
                    .ok_or("missing text")?
                    .join(" ");
                let (mut s, _) = connect(target(w, 1)?, ms(w, 3, "timeout")?)?;
                s.write_all(text.as_bytes())
                    .map_err(|e| format!("send: {e}"))?;
                let mut buf = vec![0u8; text.len()];
                s.set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                ))
                .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
                s.read_exact(&mut buf)
                    .map_err(|e| format!("receive: {e}"))?;
                if buf != text.as_bytes() {
                    return Err("the echo differs from what was sent".into());
                }
                Ok(start.elapsed().as_nanos().to_string())
            }
            "retry" => retry(
                target(w, 1)?,
                ms(w, 3, "deadline")?,
                ms(w, 4, "attempt timeout")?,
                ms(w, 5, "interval")?,
            ),
            "udp" => {
                let t = ms(w, 3, "timeout")?;
                let u = udp_socket(target(w, 1)?, t)?;
                let start = Instant::now();
                udp_round_trip(&u, 0)?;
                Ok(start.elapsed().as_nanos().to_string())
            }
            "rr" => rr(w),
            "flood" => flood(target(w, 1)?, arg(w, 3, "rate")?, ms(w, 4, "duration")?),
            "bulk" => bulk(target(w, 1)?, arg(w, 3, "bytes")?, ms(w, 4, "timeout")?),
            "open" => {
                let id = arg::<String>(w, 1, "id")?;
                let start = Instant::now();
                let t = ms(w, 4, "timeout")?;
                let (mut s, _) = connect(target(w, 2)?, t)?;
                round_trip(&mut s, 0, start + t)?;
                self.conns.insert(id, (s, 1));
                Ok(start.elapsed().as_nanos().to_string())
            }
            "ping" => {
                let id = arg::<String>(w, 1, "id")?;
                let t = ms(w, 2, "timeout")?;
                let (s, seq) = self
                    .conns
                    .get_mut(&id)
                    .ok_or(format!("no connection {id}"))?;
                let start = Instant::now();
                *seq += 1;
                round_trip(s, *seq, start + t)?;
                Ok(start.elapsed().as_nanos().to_string())
            }
            "close" => {
                let id = arg::<String>(w, 1, "id")?;
                self.conns
                    .remove(&id)
                    .ok_or(format!("no connection {id}"))?;
                Ok(String::new())
            }
            "stream" => self.stream(w),
            "stream-stats" | "stream-stop" => {
                let id = arg::<String>(w, 1, "id")?;
                let st = self.streams.get(&id).ok_or(format!("no stream {id}"))?;
                let state = st.state.clone();
                if w[0] == "stream-stop" {
                    state.stop.store(true, Ordering::Relaxed);
                    if let Some(s) = self.streams.remove(&id) {
                        let _ = s.thread.join();
                    }
                }
                let last = state
                    .last_error
                    .lock()
                    .map(|s| s.clone())
                    .unwrap_or_default();
                Ok(format!(
                    "{} {} {last}",
                    state.ok.load(Ordering::Relaxed),
                    state.failed.load(Ordering::Relaxed)
                )
                .trim_end()
                .to_string())
            }
            "hello" => Ok(std::process::id().to_string()),
            "quit" => Ok(String::new()),
            other => Err(format!("unknown command {other}")),
        }
    }

    fn serve(&mut self, port: u16) -> Answer {
        if self.served.contains_key(&port) {
            return Ok(String::new());
        }
        let any = SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0);
        let tcp = dual_stack(rustix::net::SocketType::STREAM, any)
            .map_err(|e| format!("tcp [::]:{port}: {e}"))?;
        rustix::net::listen(&tcp, 128).map_err(|e| format!("listen [::]:{port}: {e}"))?;
        let tcp = TcpListener::from(tcp);
        let udp = UdpSocket::from(
            dual_stack(rustix::net::SocketType::DGRAM, any)
                .map_err(|e| format!("udp [::]:{port}: {e}"))?,
        );
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut conn) = conn else { continue };
                c.tcp.fetch_add(1, Ordering::Relaxed);
                let _ = conn.set_nodelay(true);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let c = counters.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                c.udp.fetch_add(1, Ordering::Relaxed);
                let _ = udp.send_to(&buf[..n], from);
            }
        });
        self.served.insert(port, counters);
        Ok(String::new())
    }

    fn stream(&mut self, w: &[&str]) -> Answer {
        let id = arg::<String>(w, 1, "id")?;
        if self.streams.contains_key(&id) {
            return Err(format!("stream {id} exists"));
        }
        let interval = ms(w, 4, "interval")?;
        let t = ms(w, 5, "timeout")?;
        let (mut s, _) = connect(target(w, 2)?, t)?;
        round_trip(&mut s, 0, Instant::now() + t)?;
        let state = Arc::new(StreamState::default());
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let mut seq = 0;
            let mut next = Instant::now();
            while !st.stop.load(Ordering::Relaxed) {
                next += interval;
                seq += 1;
                match round_trip(&mut s, seq, Instant::now() + t) {
                    Ok(()) => st.ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if let Ok(mut l) = st.last_error.lock() {
                            *l = e;
                        }
                        st.failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        self.streams.insert(id, Stream { state, thread });
        Ok(String::new())
    }
}

/// A socket on `[::]:port` that also takes IPv4 (IPV6_V6ONLY off).
fn dual_stack(
    kind: rustix::net::SocketType,
    addr: SocketAddrV6,
) -> std::io::Result<std::os::fd::OwnedFd> {
    let fd = rustix::net::socket(rustix::net::AddressFamily::INET6, kind, None)?;
    rustix::net::sockopt::set_ipv6_v6only(&fd, false)?;
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    Ok(fd)
}

/// Sends `bytes` to the echo server at `to` while a second thread reads
/// the echo; the time until the last byte came back.
fn bulk(to: SocketAddr, bytes: u64, timeout: Duration) -> Answer {
    let start = Instant::now();
    let (mut s, _) = connect(to, timeout)?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let mut r = s.try_clone().map_err(|e| format!("clone: {e}"))?;
    let reader = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = r.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                return Err(format!("closed with {left} bytes not echoed"));
            }
            left = left.saturating_sub(n as u64);
        }
        Ok(())
    });
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).map_err(|e| format!("send: {e}"))?;
        left -= n as u64;
    }
    reader
        .join()
        .map_err(|_| "the reader panicked".to_string())??;
    Ok(start.elapsed().as_nanos().to_string())
}

fn connect(to: SocketAddr, timeout: Duration) -> Result<(TcpStream, Instant), String> {
    let s = TcpStream::connect_timeout(&to, timeout).map_err(|e| format!("connect {to}: {e}"))?;
    s.set_nodelay(true)
        .map_err(|e| format!("TCP_NODELAY: {e}"))?;
    Ok((s, Instant::now()))
}

/// Sends `seq` (8 bytes) and waits until its echo comes back; older echoes
/// (answers to requests that timed out) are skipped.
fn round_trip(s: &mut TcpStream, seq: u64, deadline: Instant) -> Result<(), String> {
    s.write_all(&seq.to_be_bytes())
        .map_err(|e| format!("send: {e}"))?;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for the echo".into());
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "timed out waiting for the echo".to_string()
            }
            std::io::ErrorKind::UnexpectedEof => "connection closed".to_string(),
            _ => format!("receive: {e}"),
        })?;
        let got = u64::from_be_bytes(buf);
        if got == seq {
            return Ok(());
        }
        if got > seq {
            return Err(format!("echo {got} for request {seq}"));
        }
    }
}

fn retry(to: SocketAddr, deadline: Duration, attempt: Duration, interval: Duration) -> Answer {
    let start = Instant::now();
    let mut failed = 0u64;
    loop {
        let begun = Instant::now();
        let result =
            connect(to, attempt).and_then(|(mut s, _)| round_trip(&mut s, 0, begun + attempt));
        match result {
            Ok(()) => return Ok(format!("{failed} {}", start.elapsed().as_nanos())),
            Err(e) => {
                failed += 1;
                if start.elapsed() >= deadline {
                    return Err(format!("{failed} {e}"));
                }
            }
        }
        std::thread::sleep((begun + interval).saturating_duration_since(Instant::now()));
    }
}

/// Sends 16-byte UDP datagrams to `to` at `rate` per second (in batches
/// every millisecond) for `duration`; answers how many the kernel took.
fn flood(to: SocketAddr, rate: u64, duration: Duration) -> Result<String, String> {
    let u = udp_socket(to, Duration::from_millis(100))?;
    let start = Instant::now();
    let mut sent = 0u64;
    let payload = [0x5au8; 16];
    while start.elapsed() < duration {
        // Packets due by now, sent at once; then wait for the next millisecond.
        let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            match u.send(&payload) {
                Ok(_) => sent += 1,
                // ENOBUFS and friends: the datagram was not taken; try on.
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(sent.to_string())
}

fn udp_socket(to: SocketAddr, timeout: Duration) -> Result<UdpSocket, String> {
    let local: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let u = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
    u.connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    u.set_read_timeout(Some(timeout))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    Ok(u)
}

fn udp_round_trip(u: &UdpSocket, seq: u64) -> Result<(), String> {
    u.send(&seq.to_be_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 64];
    loop {
        let n = u.recv(&mut buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "timed out waiting for the reply".to_string()
            }
            _ => format!("receive: {e}"),
        })?;
        if n == 8 && buf[..8] == seq.to_be_bytes() {
            return Ok(());
        }
    }
}

fn rr(w: &[&str]) -> Answer {
    let proto = *w.get(1).ok_or("missing proto")?;
    let to = target(w, 2)?;
    let n: usize = arg(w, 4, "count")?;
    let t = ms(w, 5, "timeout")?;
    let mut samples = Vec::with_capacity(n);
    match proto {
        "tcp" => {
            let (mut s, _) = connect(to, t)?;
            round_trip(&mut s, 0, Instant::now() + t)?;
            // One timeout for all samples: two syscalls per sample, no more.
            s.set_read_timeout(Some(t))
                .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
            let mut buf = [0u8; 8];
            for seq in 1..=n as u64 {
                let start = Instant::now();
                s.write_all(&seq.to_be_bytes())
                    .and_then(|()| s.read_exact(&mut buf))
                    .map_err(|e| format!("round trip {seq}: {e}"))?;
                samples.push(start.elapsed().as_nanos() as u64);
                if buf != seq.to_be_bytes() {
                    return Err(format!(
                        "round trip {seq}: echo {}",
                        u64::from_be_bytes(buf)
                    ));
                }
            }
        }
        "udp" => {
            let u = udp_socket(to, t)?;
            for seq in 1..=n as u64 {
                let start = Instant::now();
                udp_round_trip(&u, seq).map_err(|e| format!("round trip {seq}: {e}"))?;
                samples.push(start.elapsed().as_nanos() as u64);
            }
        }
        other => return Err(format!("bad proto {other:?}: want tcp or udp")),
    }
    let mut out = String::with_capacity(n * 8);
    for (i, s) in samples.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&s.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port free on both TCP and UDP right now (in the test's own netns).
    fn free_port() -> u16 {
        loop {
            let t = TcpListener::bind("[::]:0").expect("bind tcp");
            let port = t.local_addr().expect("addr").port();
            if UdpSocket::bind(("::", port)).is_ok() {
                return port;
            }
        }
    }

    fn ok(w: &mut Workload, line: &str) -> String {
        let (a, _) = w.handle(line);
        a.strip_prefix("ok")
            .unwrap_or_else(|| panic!("`{line}`: {a}"))
            .trim()
            .to_string()
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        let mut w = Workload::default();
        assert_eq!(w.handle("bogus 1").0, "fail unknown command bogus");
        assert_eq!(w.handle("stats 9").0, "fail not serving 9");
        assert_eq!(w.handle("connect ::1").0, "fail missing port");
        assert_eq!(
            w.handle("connect example.org 80 10").0,
            "fail bad host \"example.org\""
        );
        assert_eq!(w.handle("ping x 10").0, "fail no connection x");
        assert_eq!(
            w.handle("rr sctp ::1 1 1 10").0,
            "fail bad proto \"sctp\": want tcp or udp"
        );
        assert_eq!(w.handle("quit"), ("ok".to_string(), true));
    }

    #[test]
    fn echo_over_loopback_v4_and_v6() {
        let mut w = Workload::default();
        let port = free_port();
        ok(&mut w, &format!("serve {port}"));
        for host in ["127.0.0.1", "::1"] {
            let ns: u64 = ok(&mut w, &format!("connect {host} {port} 1000"))
                .parse()
                .expect("ns");
            assert!(ns > 0);
            ok(&mut w, &format!("udp {host} {port} 1000"));
            let samples = ok(&mut w, &format!("rr tcp {host} {port} 5 1000"));
            assert_eq!(samples.split(' ').count(), 5, "{samples}");
            let samples = ok(&mut w, &format!("rr udp {host} {port} 3 1000"));
            assert_eq!(samples.split(' ').count(), 3, "{samples}");
        }
        let retry = ok(&mut w, &format!("retry ::1 {port} 1000 100 10"));
        assert!(retry.starts_with("0 "), "{retry}");
        ok(&mut w, &format!("open c 127.0.0.1 {port} 1000"));
        ok(&mut w, "ping c 1000");
        ok(&mut w, "close c");
        ok(&mut w, &format!("stream s ::1 {port} 2 1000"));
        // Wait for the stream's own count, not a guessed duration.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ok(&mut w, "stream-stats s")
            .split(' ')
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .is_none_or(|n| n < 3)
        {
            assert!(
                Instant::now() < deadline,
                "3 stream round trips within 10 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let st = ok(&mut w, "stream-stop s");
        let (okn, failed) = st.split_once(' ').expect("two counts");
        assert!(
            okn.parse::<u64>().expect("ok count") >= 3 && failed == "0",
            "{st}"
        );
        // 2 × (connect + rr) + retry + open + stream connections.
        assert_eq!(ok(&mut w, &format!("stats {port}")), "7 8");
    }

    #[test]
    fn retry_reports_failures_until_the_deadline() {
        let mut w = Workload::default();
        let port = free_port(); // nothing serves it
        let (a, _) = w.handle(&format!("retry 127.0.0.1 {port} 50 10 10"));
        let rest = a.strip_prefix("fail ").unwrap_or_else(|| panic!("{a}"));
        let (n, why) = rest.split_once(' ').expect("count and reason");
        assert!(n.parse::<u64>().expect("count") >= 3, "{a}");
        assert!(why.contains("refused"), "{a}");
    }
}
