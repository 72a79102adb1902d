//! [`PodProcess`]: a typed handle on a pod's `lab-pod` workload.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::LabError;

/// A transport for [`PodProcess::rr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// One TCP connection (TCP_NODELAY).
    Tcp,
    /// One connected UDP socket.
    Udp,
}

/// What [`PodProcess::connect_retry`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRetry {
    /// Attempts that failed before the first success.
    pub failed_attempts: u64,
    /// From the first attempt to the first successful echo.
    pub time_to_success: Duration,
}

/// Round trips of a background stream so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// Round trips that got their echo in time.
    pub ok: u64,
    /// Round trips that did not.
    pub failed: u64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// The `lab-pod` workload of one pod (see [`super::pod`] for its protocol),
/// in the pod's network namespace and cgroup. Killed on drop.
#[derive(Debug)]
pub struct PodProcess {
    pod: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// Slack on top of a command's own timeout before the handle gives up on
/// the process.
const SLACK: Duration = Duration::from_secs(10);

fn ms(d: Duration) -> u128 {
    d.as_millis().max(1)
}

impl PodProcess {
    /// Spawns `cmd` (a `lab-exec … lab-pod` command) with piped stdio.
    pub(super) fn spawn(pod: &str, mut cmd: Command) -> Result<Self, LabError> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| LabError::sys("spawn", format!("lab-pod for {pod}: {cmd:?}"), e))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(LabError::Thread(format!("pod {pod}: no stdio pipes")));
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut p = Self {
            pod: pod.to_string(),
            child,
            stdin,
            lines,
        };
        // An answer proves lab-exec joined the cgroup and netns and exec'd.
        let pid = p.cmd("hello", Duration::ZERO)?;
        if pid != p.child.id().to_string() {
            return Err(p.err("hello", format!("pid {pid}, spawned {}", p.child.id())));
        }
        Ok(p)
    }

    /// The process id (of `lab-pod` itself: lab-exec execs into it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pod's name.
    pub fn pod(&self) -> &str {
        &self.pod
    }

    fn err(&self, command: &str, reason: impl Into<String>) -> LabError {
        LabError::Pod {
            pod: self.pod.clone(),
            command: command.to_string(),
            reason: reason.into(),
        }
    }

    /// Sends one command line and returns what follows `ok` in its answer.
    pub fn cmd(&mut self, line: &str, timeout: Duration) -> Result<String, LabError> {
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| self.err(line, format!("writing the command: {e} (process gone?)")))?;
        let answer = self
            .lines
            .recv_timeout(timeout + SLACK)
            .map_err(|e| self.err(line, format!("no answer: {e}")))?;
        if answer == "ok" {
            Ok(String::new())
        } else if let Some(rest) = answer.strip_prefix("ok ") {
            Ok(rest.to_string())
        } else if let Some(reason) = answer.strip_prefix("fail ") {
            Err(self.err(line, reason))
        } else {
            Err(self.err(line, format!("unexpected answer {answer:?}")))
        }
    }

    fn nanos(&self, line: &str, s: &str) -> Result<Duration, LabError> {
        s.trim()
            .parse::<u64>()
            .map(Duration::from_nanos)
            .map_err(|_| self.err(line, format!("bad duration {s:?}")))
    }

    /// Serves TCP and UDP echo on `[::]:port` (IPv4 too).
    pub fn serve(&mut self, port: u16) -> Result<(), LabError> {
        self.cmd(&format!("serve {port}"), Duration::ZERO).map(drop)
    }

    /// TCP connections accepted and UDP datagrams received on `port`.
    pub fn served(&mut self, port: u16) -> Result<(u64, u64), LabError> {
        let line = format!("stats {port}");
        let s = self.cmd(&line, Duration::ZERO)?;
        let mut it = s.split(' ').map(str::parse::<u64>);
        match (it.next(), it.next()) {
            (Some(Ok(t)), Some(Ok(u))) => Ok((t, u)),
            _ => Err(self.err(&line, format!("bad answer {s:?}"))),
        }
    }

    /// One TCP connect and one echo round trip; the time both took.
    pub fn connect(
        &mut self,
        addr: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<Duration, LabError> {
        let line = format!("connect {addr} {port} {}", ms(timeout));
        let s = self.cmd(&line, timeout)?;
        self.nanos(&line, &s)
    }

    /// `bytes` through the echo server at `addr:port` on one connection
    /// (sent and echoed back at once); the time it took.
    pub fn bulk(
        &mut self,
        addr: IpAddr,
        port: u16,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Duration, LabError> {
        let line = format!("bulk {addr} {port} {bytes} {}", ms(timeout));
        let s = self.cmd(&line, timeout)?;
        self.nanos(&line, &s)
    }

    /// One TCP connection carrying `text` (one line, no newline) and its
    /// echo; the time it took.
    pub fn send_text(
        &mut self,
        addr: IpAddr,
        port: u16,
        text: &str,
        timeout: Duration,
    ) -> Result<Duration, LabError> {
        let line = format!("send {addr} {port} {} {text}", ms(timeout));
        let s = self.cmd(&line, timeout)?;
        self.nanos(&line, &s)
    }

    /// Tries connect + echo every 10 ms (each attempt 20 ms at most) until
    /// one succeeds or `deadline` passes, like a client with short retries.
    pub fn connect_retry(
        &mut self,
        addr: IpAddr,
        port: u16,
        deadline: Duration,
    ) -> Result<ConnectRetry, LabError> {
        self.connect_retry_with(
            addr,
            port,
            deadline,
            Duration::from_millis(20),
            Duration::from_millis(10),
        )
    }

    /// [`Self::connect_retry`] with the per-attempt timeout and the interval
    /// between attempt starts.
    pub fn connect_retry_with(
        &mut self,
        addr: IpAddr,
        port: u16,
        deadline: Duration,
        attempt: Duration,
        interval: Duration,
    ) -> Result<ConnectRetry, LabError> {
        let line = format!(
            "retry {addr} {port} {} {} {}",
            ms(deadline),
            ms(attempt),
            ms(interval)
        );
        let s = self.cmd(&line, deadline + attempt)?;
        let (failed, ns) = s
            .split_once(' ')
            .ok_or_else(|| self.err(&line, format!("bad answer {s:?}")))?;
        Ok(ConnectRetry {
            failed_attempts: failed
                .parse()
                .map_err(|_| self.err(&line, format!("bad answer {s:?}")))?,
            time_to_success: self.nanos(&line, ns)?,
        })
    }

    /// One UDP request and its reply.
    pub fn udp(
        &mut self,
        addr: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<Duration, LabError> {
        let line = format!("udp {addr} {port} {}", ms(timeout));
        let s = self.cmd(&line, timeout)?;
        self.nanos(&line, &s)
    }

    /// `n` request/response round trips on one connection (or UDP socket),
    /// each sample in nanoseconds, in order.
    pub fn rr(
        &mut self,
        addr: IpAddr,
        port: u16,
        proto: Proto,
        n: usize,
    ) -> Result<Vec<u64>, LabError> {
        let p = match proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let per = Duration::from_secs(2);
        let line = format!("rr {p} {addr} {port} {n} {}", ms(per));
        let s = self.cmd(&line, per + Duration::from_millis(n as u64))?;
        s.split(' ')
            .filter(|w| !w.is_empty())
            .map(|w| {
                w.parse::<u64>()
                    .map_err(|_| self.err(&line, format!("bad sample {w:?}")))
            })
            .collect()
    }

    /// Opens a kept TCP connection `id` (with one round trip).
    pub fn open(
        &mut self,
        id: &str,
        addr: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<Duration, LabError> {
        let line = format!("open {id} {addr} {port} {}", ms(timeout));
        let s = self.cmd(&line, timeout)?;
        self.nanos(&line, &s)
    }

    /// One round trip on the kept connection `id`.
    pub fn ping(&mut self, id: &str, timeout: Duration) -> Result<Duration, LabError> {
        let line = format!("ping {id} {}", ms(timeout));
        let s = self.cmd(&line, timeout)?;
        self.nanos(&line, &s)
    }

    /// Closes the kept connection `id`.
    pub fn close(&mut self, id: &str) -> Result<(), LabError> {
        self.cmd(&format!("close {id}"), Duration::ZERO).map(drop)
    }

    /// Sends UDP datagrams to `to:port` at `rate`/s for `duration`; how many
    /// the kernel took.
    pub fn flood(
        &mut self,
        to: IpAddr,
        port: u16,
        rate: u64,
        duration: Duration,
    ) -> Result<u64, LabError> {
        let line = format!("flood {to} {port} {rate} {}", duration.as_millis());
        let out = self.cmd(&line, duration + Duration::from_secs(10))?;
        out.trim()
            .parse()
            .map_err(|_| self.err(&line, format!("bad count {out:?}")))
    }

    /// Starts stream `id`: one connection, a round trip every `interval`
    /// (each waiting `timeout` at most), counted in the background.
    pub fn stream(
        &mut self,
        id: &str,
        addr: IpAddr,
        port: u16,
        interval: Duration,
        timeout: Duration,
    ) -> Result<(), LabError> {
        let line = format!("stream {id} {addr} {port} {} {}", ms(interval), ms(timeout));
        self.cmd(&line, timeout).map(drop)
    }

    /// The counts of stream `id` so far.
    pub fn stream_stats(&mut self, id: &str) -> Result<StreamStats, LabError> {
        self.stream_answer(&format!("stream-stats {id}"))
    }

    /// Stops stream `id`; its final counts.
    pub fn stream_stop(&mut self, id: &str) -> Result<StreamStats, LabError> {
        self.stream_answer(&format!("stream-stop {id}"))
    }

    fn stream_answer(&mut self, line: &str) -> Result<StreamStats, LabError> {
        let s = self.cmd(line, Duration::from_secs(10))?;
        let mut it = s.splitn(3, ' ');
        match (
            it.next().map(str::parse::<u64>),
            it.next().map(str::parse::<u64>),
            it.next(),
        ) {
            (Some(Ok(ok)), Some(Ok(failed)), last) => Ok(StreamStats {
                ok,
                failed,
                last_error: last.map(str::to_string),
            }),
            _ => Err(self.err(line, format!("bad answer {s:?}"))),
        }
    }

    /// Asks the process to exit and waits for it.
    pub fn quit(mut self) -> Result<(), LabError> {
        self.cmd("quit", Duration::ZERO)?;
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        // Not yet waited for, so the pid cannot have been reused.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
