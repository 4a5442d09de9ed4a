//! The standalone source: a directory of Kubernetes manifests, polled.
//!
//! Polling file metadata (rather than inotify) sees every way a file can
//! change, including editors that replace it and bind mounts, at the cost
//! of one `stat` per file per poll. Only changed files are parsed again.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    manifest::{ManifestError, Object, ParsedFile, parse_manifests},
    model::ObjectRef,
};

#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// What a rescan found in files that changed, for the caller to log.
#[derive(Debug, Default)]
pub struct Rescan {
    pub changed: bool,
    pub errors: Vec<ManifestError>,
    pub skipped: Vec<String>,
}

/// The objects of the directory, with the file each came from.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub origins: BTreeMap<ObjectRef, PathBuf>,
    /// Objects defined in more than one file: (object, ignored file, kept file).
    pub duplicates: Vec<(ObjectRef, PathBuf, PathBuf)>,
}

pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, (Fingerprint, ParsedFile)>,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(ext, Some("yaml" | "yml" | "json"))
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), files: BTreeMap::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks for added, changed and removed files and parses what changed.
    pub fn rescan(&mut self) -> io::Result<Rescan> {
        let mut seen = BTreeMap::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if !is_manifest(&path) {
                continue;
            }
            // A file may vanish between listing and stat: it is simply gone.
            let Ok(meta) = fs::metadata(&path) else { continue };
            if !meta.is_file() {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            let print = Fingerprint { modified: meta.modified().ok(), len: meta.len(), inode: meta.ino() };
            seen.insert(path, print);
        }
        let mut rescan = Rescan::default();
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains_key(path));
        rescan.changed = self.files.len() != before;
        for (path, print) in seen {
            if self.files.get(&path).is_some_and(|(old, _)| *old == print) {
                continue;
            }
            let parsed = match fs::read_to_string(&path) {
                Ok(text) => parse_manifests(&path, &text),
                Err(e) => ParsedFile {
                    errors: vec![ManifestError::Document { file: path.clone(), document: 0, message: e.to_string() }],
                    ..Default::default()
                },
            };
            rescan.errors.extend(parsed.errors.iter().cloned());
            rescan.skipped.extend(parsed.skipped.iter().map(|s| format!("{}: {s}", path.display())));
            self.files.insert(path, (print, parsed));
            rescan.changed = true;
        }
        Ok(rescan)
    }

    /// Every object of the directory; the first file (by name) wins a duplicate.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (path, (_, parsed)) in &self.files {
            for object in &parsed.objects {
                let reference = object.object_ref();
                if let Some(first) = snapshot.origins.get(&reference) {
                    snapshot.duplicates.push((reference, path.clone(), first.clone()));
                    continue;
                }
                snapshot.origins.insert(reference, path.clone());
                match object {
                    Object::Service(s) => snapshot.services.push(s.clone()),
                    Object::EndpointSlice(s) => snapshot.slices.push(s.clone()),
                }
            }
        }
        snapshot
    }
}
