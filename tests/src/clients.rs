//! Clients that reach Services by each path a real client can take, so one
//! test of a Service behaviour runs on every path:
//!
//! - `PodTc`: a pod, agent with default flags (`--socket-lb host`): its
//!   packets are translated by `tc_from_pod`.
//! - `PodSocket`: a pod, agent with `--socket-lb all`: its sockets are
//!   translated at connect by the cgroup hooks.
//! - `Host`, `Host6`: a host-network process (the node's namespace), agent
//!   with default flags: the cgroup hooks, on an AF_INET socket, or on an
//!   AF_INET6 socket using the v4-mapped address.
//!
//! A client is a `probe` process in the client's network namespace, driven
//! line by line (see src/bin/probe.rs).
use std::{
    ffi::CString,
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::{
    agent::lb_binary,
    netns::{Netns, unique_tag},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientPath {
    PodTc,
    PodSocket,
    Host,
    Host6,
}

impl ClientPath {
    pub const ALL: [ClientPath; 4] = [ClientPath::PodTc, ClientPath::PodSocket, ClientPath::Host, ClientPath::Host6];

    /// Whether the client is a pod (else a host-network process).
    pub fn is_pod(self) -> bool {
        matches!(self, ClientPath::PodTc | ClientPath::PodSocket)
    }

    /// Whether the socket hooks translate it (else the tc program).
    pub fn at_socket(self) -> bool {
        self != ClientPath::PodTc
    }

    /// The probe's mode for `base` (tcp, udp, udp-connected) on this path.
    fn mode(self, base: &str) -> String {
        match self {
            ClientPath::Host6 => base.replacen("tcp", "tcp6", 1).replacen("udp", "udp6", 1),
            _ => base.to_owned(),
        }
    }
}

/// A cgroup v2 directory of the test's own, removed on drop. With
/// `--socket-lb all` the agent translates every namespace's sockets; tests
/// attach it here, not at the root, so that it translates only the
/// clients they move in, never another test's running in parallel.
pub struct TestCgroup(pub PathBuf);

impl TestCgroup {
    pub fn new() -> Self {
        let root = lb_userspace::mounts::cgroup2_root().expect("cgroup v2 mounted");
        let path = root.join(format!("lbt-{}", unique_tag()));
        std::fs::create_dir(&path).expect("creating a test cgroup");
        Self(path)
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty once the probes have exited.
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `probe ARGS` in `netns`, moved into `cgroup` (if any) before it runs.
pub fn probe_command(netns: &Netns, cgroup: Option<&Path>) -> Command {
    let mut command = Command::new("nsenter");
    command.arg(format!("--net={}", netns.path().display())).arg(lb_binary().with_file_name("probe"));
    if let Some(cgroup) = cgroup {
        move_into_cgroup(&mut command, cgroup);
    }
    command
}

/// Makes `command`'s process move itself into `cgroup` before it execs.
pub fn move_into_cgroup(command: &mut Command, cgroup: &Path) {
    let procs = CString::new(cgroup.join("cgroup.procs").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process: the child, before it execs.
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            let written = fd >= 0 && libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            if fd >= 0 {
                libc::close(fd);
            }
            if written { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
    }
}

/// What one exchange gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The answering pod, and the peer address the socket API reported.
    From { pod: String, peer: String },
    /// The call failed: io::ErrorKind as Debug, and how long it took (ms).
    Error { kind: String, ms: u64 },
}

impl Answer {
    pub fn pod(&self) -> Option<&str> {
        match self {
            Answer::From { pod, .. } => Some(pod),
            Answer::Error { .. } => None,
        }
    }

    fn parse(line: &str) -> Self {
        let field =
            |name: &str| line.split_whitespace().find_map(|w| w.strip_prefix(name)).unwrap_or_default().to_owned();
        if line.starts_with("error=") {
            Answer::Error { kind: field("error="), ms: field("ms=").parse().unwrap_or(u64::MAX) }
        } else {
            Answer::From { pod: field("answer="), peer: field("peer=") }
        }
    }
}

/// A running client on one path.
pub struct Client {
    pub path: ClientPath,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    /// A client in `netns` (a pod's, or the node's for host paths); in
    /// `cgroup` for `PodSocket`.
    pub fn start(path: ClientPath, netns: &Netns, cgroup: Option<&Path>) -> Self {
        let mut command = probe_command(netns, cgroup);
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = command.spawn().expect("starting probe");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { path, child, stdin, stdout }
    }

    fn command(&mut self, line: &str) -> Answer {
        writeln!(self.stdin, "{line}").expect("probe stdin");
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).expect("probe stdout");
        assert!(!answer.is_empty(), "probe exited at {line:?}");
        Answer::parse(answer.trim())
    }

    /// One exchange on a new socket: `mode` is tcp, udp or udp-connected,
    /// made AF_INET6 on the `Host6` path. An IPv6 `addr` is used as it is
    /// on every path (on an AF_INET6 socket, of course).
    pub fn ask(&mut self, mode: &str, addr: impl Into<SocketAddr>) -> Answer {
        let mode = self.path.mode(mode);
        self.command(&format!("{mode} {}", addr.into()))
    }

    /// The pods that answered `count` TCP connections (every one must).
    pub fn tcp_pods(&mut self, addr: impl Into<SocketAddr>, count: usize) -> Vec<String> {
        let addr = addr.into();
        (0..count)
            .map(|_| match self.ask("tcp", addr) {
                Answer::From { pod, .. } => pod,
                error => panic!("{:?}: TCP to {addr}: {error:?}", self.path),
            })
            .collect()
    }

    /// Opens a socket (`tcp`: a connection; `udp`, `udp-connected`) and
    /// keeps it for `kept`.
    pub fn keep(&mut self, mode: &str, addr: impl Into<SocketAddr>) -> Answer {
        let mode = self.path.mode(mode);
        self.command(&format!("keep {mode} {}", addr.into()))
    }

    /// One exchange on the kept socket.
    pub fn kept(&mut self) -> Answer {
        self.command("kept")
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
