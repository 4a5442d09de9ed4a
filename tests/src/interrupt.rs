//! Clean-up for long runs stopped by hand (the benchmarks). Everything a
//! process makes is named with its `process_tag`, so what the dropped
//! values would have removed can still be found by name.
use std::{collections::BTreeMap, fs, path::Path, thread};

use crate::netns::{process_tag, run};

/// Blocks SIGINT and SIGTERM in the calling thread, and so in every thread
/// it starts later, and starts one that waits for them. On either, it
/// kills this process's descendants and removes the network namespaces,
/// bpffs pins and temporary directories of this process and of those
/// descendants, then exits with 130. Call it first thing in `main`.
pub fn clean_up_on_interrupt() {
    // SAFETY: signal-set calls on a set of our own, then blocking it for
    // this thread; children get a fresh mask when they exec.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: waits for one of the signals blocked above.
        unsafe { libc::sigwait(&set, &mut signal) };
        eprintln!("interrupted: removing this run's processes, namespaces, pins and temporary files");
        let descendants = descendants(std::process::id());
        for pid in &descendants {
            // SAFETY: a plain kill(2).
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
        let tags: Vec<String> = descendants.iter().map(|pid| format!("{pid:06x}")).chain([process_tag()]).collect();
        remove_tagged(&tags);
        std::process::exit(130);
    });
}

/// Every process below `root`, from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            found.push(*child);
            todo.push(*child);
        }
    }
    found
}

/// Removes namespaces (`lbt<tag>…`), pin directories (`lbt-<tag>…`) and
/// temporary directories (`<prefix>-<unique tag>`) named with one of `tags`.
fn remove_tagged(tags: &[String]) {
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| e.file_name().into_string().ok()).collect()
    };
    for name in names(Path::new("/run/netns")) {
        if tags.iter().any(|t| name.starts_with(&format!("lbt{t}"))) {
            let _ = run("ip", &["netns", "delete", &name]);
        }
    }
    for name in names(Path::new("/sys/fs/bpf")) {
        if tags.iter().any(|t| name.starts_with(&format!("lbt-{t}"))) {
            let _ = fs::remove_dir_all(Path::new("/sys/fs/bpf").join(name));
        }
    }
    let temp = std::env::temp_dir();
    for name in names(&temp) {
        let unique = name.rsplit_once('-').map_or("", |(_, tag)| tag);
        if unique.len() == 9 && tags.iter().any(|t| unique.starts_with(t.as_str())) {
            let _ = fs::remove_dir_all(temp.join(name));
        }
    }
}
