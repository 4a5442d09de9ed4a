//! The real `lb` binary, run as a process inside a node namespace.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use lb_userspace::{datapath::Maps, plan::MapContents};

use crate::netns::{Netns, unique_tag};

/// The `lb` binary next to the running executable (target/<profile>/lb),
/// or `LB_BIN`.
pub fn lb_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LB_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let lb = dir.join("lb");
    assert!(lb.exists(), "{} missing: run `cargo build` for this profile first", lb.display());
    lb
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", unique_tag()));
        fs::create_dir_all(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A running agent. Dropping it stops the agent and removes its pins.
pub struct Agent {
    child: Child,
    command: Vec<std::ffi::OsString>,
    pub pin_path: PathBuf,
    /// The node's network namespace, where `cli` runs `lb` too.
    net: PathBuf,
    log: PathBuf,
    _log_dir: TempDir,
}

impl Agent {
    /// Starts `lb run ARGS` in `node` with a pin path of its own and
    /// otherwise the agent's defaults, as the chart ships it: socket-level
    /// balancing at the cgroup v2 root for `node`'s own sockets
    /// (`--socket-lb host`), so pods (other namespaces) take the tc path.
    pub fn start(node: &Netns, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_entering(node, &[], args)
    }

    /// As `start`, entering other namespaces first too: `namespaces` are
    /// nsenter options, such as `--mount=/proc/PID/ns/mnt` (a host layout
    /// a test arranged in a mount namespace of its own).
    pub fn start_entering(node: &Netns, namespaces: &[String], args: &[&str]) -> anyhow::Result<Self> {
        let log_dir = TempDir::new("lb-agent-log")?;
        let log = log_dir.0.join("agent.log");
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/lbt-{}", unique_tag()));
        let mut command: Vec<std::ffi::OsString> = namespaces.iter().map(Into::into).collect();
        command.extend([
            format!("--net={}", node.path().display()).into(),
            lb_binary().into(),
            "run".into(),
            "--pin-path".into(),
            pin_path.clone().into(),
        ]);
        command.extend(args.iter().map(Into::into));
        let child = Self::spawn(&command, &log)?;
        Ok(Self { child, command, pin_path, net: node.path(), log, _log_dir: log_dir })
    }

    fn spawn(command: &[std::ffi::OsString], log: &Path) -> anyhow::Result<Child> {
        let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
        std::process::Command::new("nsenter")
            .args(command)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lb")
    }

    /// Starts `lb run --source dir:MANIFESTS`.
    pub fn with_manifests(node: &Netns, manifests: &Path) -> anyhow::Result<Self> {
        Self::start(node, &["--source", &format!("dir:{}", manifests.display())])
    }

    /// Kernel memory of the maps pinned by this agent (bpftool's
    /// bytes_memlock, summed), in KiB.
    pub fn map_memory_kib(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for entry in fs::read_dir(&self.pin_path)? {
            let path = entry?.path();
            let is_map = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'));
            if !is_map {
                continue;
            }
            let out =
                std::process::Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&path).output()?;
            if !out.status.success() {
                bail!("bpftool map show {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            }
            let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            total += info["bytes_memlock"].as_u64().unwrap_or(0);
        }
        Ok(total / 1024)
    }

    /// The max_entries of pinned map `name`, as bpftool reads it.
    pub fn map_max_entries(&self, name: &str) -> anyhow::Result<u64> {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(self.pin_path.join(name))
            .output()?;
        if !out.status.success() {
            bail!("bpftool map show {name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        info["max_entries"].as_u64().context("no max_entries")
    }

    /// The indexes set in the pinned TAIL_CALLS program array (index
    /// `lb_common::TAIL_CALL_POD6` is the pods' IPv6 half).
    pub fn tail_calls(&self) -> anyhow::Result<Vec<u32>> {
        let map = aya::maps::MapData::from_pin(self.pin_path.join(lb_common::MAP_TAIL_CALLS))?;
        let array = aya::maps::ProgramArray::try_from(aya::maps::Map::ProgramArray(map))?;
        Ok(array.indices().collect::<Result<Vec<_>, _>>()?)
    }

    /// Resident memory of the agent process, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
    }

    /// Kills the agent with SIGKILL: no clean-up of any kind.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Starts a new agent process with the same arguments and pin path,
    /// after this one has stopped.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.stop()?;
        }
        self.child = Self::spawn(&self.command, &self.log)?;
        Ok(())
    }

    /// Stops the agent and starts it again with `extra` arguments added
    /// (same pin path: it adopts what the first one left).
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.command.extend(extra.iter().map(Into::into));
        self.restart()
    }

    /// Runs `lb SUBCOMMAND --pin-path <ours> ARGS` in the node's network
    /// namespace, as an operator on the node would, and returns its stdout.
    pub fn cli(&self, subcommand: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.net.display()))
            .arg(lb_binary())
            .arg(subcommand)
            .arg("--pin-path")
            .arg(&self.pin_path)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("lb {subcommand}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// (link id, program id) of every pinned TCX link, from bpftool.
    pub fn links(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        let mut links = Vec::new();
        for entry in fs::read_dir(self.pin_path.join("links"))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with("if_") {
                links.push(bpftool_ids(&["link", "show", "pinned"], &entry.path(), "prog_id")?);
            }
        }
        links.sort();
        Ok(links)
    }

    /// Id of the program pinned by the running agent.
    pub fn program_id(&self) -> anyhow::Result<u64> {
        Ok(bpftool_ids(&["prog", "show", "pinned"], &self.pin_path.join(lb_common::PROG_FROM_POD), "id")?.0)
    }

    /// Waits until the agent's log has a line containing `text`.
    pub fn wait_for_log(&mut self, text: &str) -> anyhow::Result<()> {
        self.wait_for_log_count(text, 1)
    }

    /// Waits until `count` lines of the log (all runs of this agent) contain `text`.
    pub fn wait_for_log_count(&mut self, text: &str, count: usize) -> anyhow::Result<()> {
        let log = self.log.clone();
        self.wait(&format!("{count} log lines with {text:?}"), |_| {
            fs::read_to_string(&log).is_ok_and(|l| l.lines().filter(|line| line.contains(text)).count() >= count)
        })
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the pinned maps hold now.
    pub fn maps(&self) -> anyhow::Result<MapContents> {
        Ok(Maps::open_pinned(&self.pin_path)?.read_contents()?)
    }

    /// Whether the agent process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|status| status.is_none())
    }

    /// Polls the pinned maps until `ready` holds, for up to 10 s.
    pub fn wait_for_maps(&mut self, what: &str, ready: impl Fn(&MapContents) -> bool) -> anyhow::Result<()> {
        self.wait(what, |pin_path| {
            Maps::open_pinned(pin_path).ok().and_then(|m| m.read_contents().ok()).is_some_and(|c| ready(&c))
        })
    }

    /// `wait_for_maps` for the IPv6 maps.
    pub fn wait_for_maps6(
        &mut self,
        what: &str,
        ready: impl Fn(&MapContents<lb_common::Ipv6>) -> bool,
    ) -> anyhow::Result<()> {
        self.wait(what, |pin_path| {
            Maps::open_pinned(pin_path).ok().and_then(|m| m.read_contents6().ok()).is_some_and(|c| ready(&c))
        })
    }

    /// Waits until the packet programs are attached to `count` interfaces
    /// (the socket programs' cgroup links not counted).
    pub fn wait_for_attachments(&mut self, count: usize) -> anyhow::Result<()> {
        self.wait(&format!("{count} attachments"), |pin_path| {
            let links = fs::read_dir(pin_path.join("links")).into_iter().flatten().flatten();
            links.filter(|e| !e.file_name().to_string_lossy().starts_with("cgroup_")).count() >= count
        })
    }

    fn wait(&mut self, what: &str, ready: impl Fn(&Path) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("agent exited ({status}) while waiting for {what}:\n{}", self.log());
            }
            if ready(&self.pin_path) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("timed out waiting for {what}; agent log:\n{}", self.log())
    }

    /// Waits for the agent to exit by itself (it refused to start, say).
    pub fn wait_for_exit(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the agent still runs after 10 s:\n{}", self.log())
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        bail!("agent did not stop within 5 s of SIGTERM")
    }
}

fn bpftool_ids(args: &[&str], path: &Path, second: &str) -> anyhow::Result<(u64, u64)> {
    let out = std::process::Command::new("bpftool").arg("-j").args(args).arg(path).output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool output")?;
    let id = |key: &str| json[key].as_u64().with_context(|| format!("no {key} in {json}"));
    Ok((id("id")?, id(second)?))
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop();
        }
        let _ = fs::remove_dir_all(&self.pin_path);
    }
}
