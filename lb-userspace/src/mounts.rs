//! The filesystems the agent needs, found in whatever mount namespace it
//! runs in, and mounted where they are missing: the cgroup v2 hierarchy (the
//! socket hooks attach to its root) and bpffs (the pins, which must outlive
//! the agent so that the datapath keeps serving across restarts).
//!
//! Hosts differ: cgroup v2 at /sys/fs/cgroup (unified), at
//! /sys/fs/cgroup/unified (hybrid: Ubuntu 20.04, Amazon Linux 2, RHEL 8),
//! only as a subtree (a container with a private cgroup namespace sees its
//! own cgroup as the root), or not mounted at all; bpffs at /sys/fs/bpf, or
//! not mounted on a fresh machine. So no path is trusted by its name: mounts
//! are read from /proc/self/mountinfo and typed by statfs, and a cgroup is
//! the hierarchy's root only if it lacks `cgroup.type`, a file every
//! non-root cgroup has (whatever namespace shows it).
//!
//! `lb mount` (the Helm chart's init container) mounts what is missing on
//! the host, from the host's namespaces, as Cilium's cgroup and bpffs
//! auto-mounts do: only there does a mount outlive the pod.
use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The default place for bpffs, where the pin path normally lives.
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(
        "no cgroup v2 hierarchy is mounted here; mount one (mount -t cgroup2 none /run/lb/cgroupv2, \
         or the chart's cgroup.autoMount) or pass --cgroup-path"
    )]
    NoCgroup2,
    #[error(
        "only part of the cgroup v2 hierarchy is mounted here ({}: a private cgroup namespace shows a \
         container its own cgroup), so host processes outside it would not be translated; mount the \
         host's hierarchy from its cgroup namespace (the chart's cgroup.autoMount does) or pass --cgroup-path",
        .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    OnlyCgroup2Subtrees(Vec<PathBuf>),
    #[error("the pin path {0} is not on a bpffs; mount one there (mount -t bpf bpf DIR) or use a path under {BPFFS}")]
    NotBpffs(PathBuf),
    #[error(
        "bpffs is not mounted on the host at {0}, and a mount made here would vanish with this container, \
         taking the datapath with it at the next restart; mount it on the host first (the chart's \
         bpf.autoMount init container does, or `mount -t bpf bpf {0}` there)"
    )]
    BpffsWouldNotOutlive(PathBuf),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MountError {
    let path = path.to_owned();
    move |source| MountError::Io { what, path, source }
}

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted (field 5).
    pub point: PathBuf,
    /// The mount's root inside its filesystem (field 4).
    pub root: String,
    pub fstype: String,
    /// In a peer group (`shared:N`): mounts below it propagate to the
    /// peers, as under a Bidirectional hostPath.
    pub shared: bool,
}

/// Parses mountinfo (proc(5)): `ID PARENT MAJ:MIN ROOT POINT OPTIONS
/// [OPTIONAL...] - FSTYPE SOURCE SUPER`, with spaces and the like in paths
/// escaped as octal (`\040`). Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let (root, point) = (fields.get(3)?, fields.get(4)?);
            let fstype = after.split(' ').next()?;
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                root: unescape(root),
                fstype: fstype.to_owned(),
                shared: fields.iter().skip(6).any(|f| f.starts_with("shared:")),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn own_mounts() -> Vec<Mount> {
    fs::read_to_string("/proc/self/mountinfo").map(|text| parse_mountinfo(&text)).unwrap_or_default()
}

/// The filesystem magic of `path` (statfs f_type).
pub fn fs_type(path: &Path) -> Option<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid C string and a statfs struct the call fills in.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } == 0).then_some(stat.f_type as i64)
}

pub fn is_bpffs(path: &Path) -> bool {
    fs_type(path) == Some(BPF_FS_MAGIC)
}

/// Whether the cgroup v2 directory `path` is the root of the hierarchy.
fn is_cgroup2_root(path: &Path) -> bool {
    fs_type(path) == Some(CGROUP2_SUPER_MAGIC) && !path.join("cgroup.type").exists()
}

/// The root of the cgroup v2 hierarchy, wherever it is mounted here (the
/// first such mount in mountinfo order).
pub fn cgroup2_root() -> Result<PathBuf, MountError> {
    let cgroup2: Vec<PathBuf> = own_mounts().into_iter().filter(|m| m.fstype == "cgroup2").map(|m| m.point).collect();
    if let Some(root) = cgroup2.iter().find(|p| is_cgroup2_root(p)) {
        return Ok(root.clone());
    }
    let subtrees: Vec<PathBuf> = cgroup2.into_iter().filter(|p| fs_type(p) == Some(CGROUP2_SUPER_MAGIC)).collect();
    Err(if subtrees.is_empty() { MountError::NoCgroup2 } else { MountError::OnlyCgroup2Subtrees(subtrees) })
}

/// The inode number of the machine's first mount namespace on kernels
/// that give it a fixed one (`MNT_NS_INIT_INO` in linux/nsfs.h, 6.18 and
/// later). Other namespaces get inode numbers from 0xF0000000 up, so this
/// never names a container's namespace.
const INITIAL_MOUNT_NS_INODE: u64 = 0xEFFF_FFF8;

/// Whether a mount made at `point` now outlives this process: it does when
/// it propagates to a peer namespace (`shared`), or when this is the
/// machine's mount namespace: the initial one, or PID 1's unless this
/// process is itself PID 1 of its PID namespace, as a container's first
/// process is. PID 1's namespace is not always readable (a hardened init,
/// as on some VMs, refuses even root), hence the inode check first.
fn mount_outlives_this_process(point: &Path) -> bool {
    let shared =
        own_mounts().into_iter().filter(|m| point.starts_with(&m.point)).max_by_key(|m| m.point.as_os_str().len());
    if shared.is_some_and(|m| m.shared) {
        return true;
    }
    let own_inode = fs::metadata("/proc/self/ns/mnt").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
    if own_inode == Some(INITIAL_MOUNT_NS_INODE) {
        return true;
    }
    let namespace = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    std::process::id() != 1 && namespace("1").is_some() && namespace("1") == namespace("self")
}

/// Mounts `fstype` at `dir`, creating the directory first.
fn mount_creating(fstype: &str, source: &str, dir: &Path) -> Result<(), MountError> {
    fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    mount(fstype, source, dir).map_err(io_error("mounting at", dir))
}

fn mount(fstype: &str, source: &str, target: &Path) -> io::Result<()> {
    let (fstype, source) = (CString::new(fstype)?, CString::new(source)?);
    let target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Makes sure the pin path lives on a bpffs that outlives the agent. One
/// already mounted (by the host, or the chart's init container) is used as
/// it is. When the pin path is under /sys/fs/bpf and nothing is mounted
/// there (a fresh machine), bpffs is mounted, but only where that mount
/// outlives the agent: on the host, not inside a container, where pins
/// would vanish with the pod and the next agent would start from nothing
/// while the old programs stayed attached. Returns whether it mounted.
pub fn ensure_bpffs(pin_path: &Path) -> Result<bool, MountError> {
    let existing = pin_path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(false);
    }
    let root = Path::new(BPFFS);
    if !pin_path.starts_with(root) || (existing != root && existing.starts_with(root)) {
        return Err(MountError::NotBpffs(pin_path.to_owned()));
    }
    if !mount_outlives_this_process(root) {
        return Err(MountError::BpffsWouldNotOutlive(root.to_owned()));
    }
    tracing::info!("mounting bpffs at {}", root.display());
    mount_creating("bpf", "bpf", root)?;
    Ok(true)
}

/// What `lb mount` does: enter the given namespaces (the host's, through
/// a host /proc), then mount bpffs and the cgroup v2 hierarchy where they
/// are not mounted yet. Must run before any thread is started (setns of a
/// mount namespace refuses a process whose threads share its fs).
#[derive(Clone, Debug, Default)]
pub struct MountRequest {
    pub cgroup_ns: Option<PathBuf>,
    pub mount_ns: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
    pub cgroup2: Option<PathBuf>,
}

/// Carries out `request`; returns one line per filesystem saying what it
/// found or did.
pub fn mount_missing(request: &MountRequest) -> Result<Vec<String>, MountError> {
    // Both namespace files are opened before either is entered: entering
    // the mount namespace changes what paths mean.
    let open = |path: &Option<PathBuf>| -> Result<Option<fs::File>, MountError> {
        path.as_ref().map(|p| fs::File::open(p).map_err(io_error("opening namespace", p))).transpose()
    };
    let (cgroup_ns, mount_ns) = (open(&request.cgroup_ns)?, open(&request.mount_ns)?);
    for (file, kind, path) in
        [(cgroup_ns, libc::CLONE_NEWCGROUP, &request.cgroup_ns), (mount_ns, libc::CLONE_NEWNS, &request.mount_ns)]
    {
        let (Some(file), Some(path)) = (file, path) else { continue };
        // SAFETY: an open namespace file of the right kind.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), kind) } != 0 {
            return Err(io_error("entering namespace", path)(io::Error::last_os_error()));
        }
    }
    let mut done = Vec::new();
    type IsMounted = fn(&Path) -> bool;
    let wanted: [(&Option<PathBuf>, &str, IsMounted, &str, &str); 2] = [
        (&request.bpffs, "bpffs", is_bpffs, "bpf", "bpf"),
        (&request.cgroup2, "cgroup v2", is_cgroup2_root, "cgroup2", "none"),
    ];
    for (dir, name, is_mounted, fstype, source) in wanted {
        let Some(dir) = dir else { continue };
        if is_mounted(dir) {
            done.push(format!("{name} already mounted at {}", dir.display()));
            continue;
        }
        mount_creating(fstype, source, dir)?;
        if !is_mounted(dir) {
            // cgroup v2 mounted from a private cgroup namespace: not the root.
            return Err(MountError::OnlyCgroup2Subtrees(vec![dir.clone()]));
        }
        done.push(format!("mounted {name} at {}", dir.display()));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_point_root_type_and_propagation() {
        let text = "\
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
51 23 0:40 / /sys/fs/bpf rw,relatime shared:7 master:1 - bpf bpf rw
60 27 0:41 /../.. /run/lb/cgroup\\040v2 rw,relatime master:3 - cgroup2 none rw
not a mountinfo line
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 3);
        assert_eq!(
            mounts[0],
            Mount { point: "/sys/fs/cgroup/unified".into(), root: "/".into(), fstype: "cgroup2".into(), shared: false }
        );
        assert!(mounts[1].shared && mounts[1].fstype == "bpf");
        assert_eq!(mounts[2].point, PathBuf::from("/run/lb/cgroup v2"));
        assert_eq!((mounts[2].root.as_str(), mounts[2].shared), ("/../..", false), "master: is not shared:");
    }

    #[test]
    fn octal_escapes_only_where_complete() {
        assert_eq!(unescape("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape("tail\\04"), "tail\\04");
        assert_eq!(unescape("back\\slash"), "back\\slash");
    }
}
