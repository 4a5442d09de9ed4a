//! The standalone source: a directory of Kubernetes manifests, polled.
//!
//! Polling file metadata (rather than inotify) sees every way a file can
//! change, including editors that replace it and bind mounts, at the cost
//! of one `stat` per file per poll. Only changed files are parsed again.
//! File times come from a coarse clock, so two same-size writes in one tick
//! look alike: files changed in the last `RACY_WINDOW` are also compared by
//! content (git's "racy clean" rule).
use std::{
    collections::BTreeMap,
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use crate::{
    manifest::{ManifestError, Object, ParsedFile, parse_manifests},
    model::Snapshot,
};

const RACY_WINDOW: Duration = Duration::from_secs(2);

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

pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Known>,
}

struct Known {
    print: Fingerprint,
    content_hash: u64,
    parsed: ParsedFile,
}

fn hash_of(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
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
            let known = self.files.get(&path);
            let racy = print.modified.is_none_or(|m| m.elapsed().is_ok_and(|age| age < RACY_WINDOW));
            if known.is_some_and(|k| k.print == print) && !racy {
                continue;
            }
            let (content_hash, parsed) = match fs::read_to_string(&path) {
                Ok(text) => {
                    let content_hash = hash_of(&text);
                    if known.is_some_and(|k| k.content_hash == content_hash) {
                        continue;
                    }
                    (content_hash, parse_manifests(&path, &text))
                }
                Err(e) => (
                    0,
                    ParsedFile {
                        errors: vec![ManifestError::Document {
                            file: path.clone(),
                            document: 0,
                            message: e.to_string(),
                        }],
                        ..Default::default()
                    },
                ),
            };
            rescan.errors.extend(parsed.errors.iter().cloned());
            rescan.skipped.extend(parsed.skipped.iter().map(|s| format!("{}: {s}", path.display())));
            self.files.insert(path, Known { print, content_hash, parsed });
            rescan.changed = true;
        }
        Ok(rescan)
    }

    /// Every object of the directory; the first file (by name) wins a duplicate.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (path, known) in &self.files {
            for object in &known.parsed.objects {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"
        )
    }

    fn names(source: &DirSource) -> Vec<String> {
        source.snapshot().services.iter().map(|s| s.metadata.name.clone().unwrap()).collect()
    }

    #[test]
    fn follows_files_being_added_changed_and_deleted() {
        let dir = std::env::temp_dir().join(format!("lb-dirsource-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut source = DirSource::new(&dir);
        assert!(!source.rescan().unwrap().changed);

        fs::write(dir.join("a.yaml"), service("a", "10.96.0.1")).unwrap();
        fs::write(dir.join(".a.yaml.swp"), "not: yaml: at all: [").unwrap();
        fs::write(dir.join("notes.txt"), "ignored").unwrap();
        assert!(source.rescan().unwrap().changed);
        assert_eq!(names(&source), ["a"]);
        assert!(!source.rescan().unwrap().changed, "nothing changed since");

        fs::write(dir.join("b.yml"), service("b", "10.96.0.2") + "---\n" + &service("a", "10.96.0.9")).unwrap();
        assert!(source.rescan().unwrap().changed);
        assert_eq!(names(&source), ["a", "b"]);
        let snapshot = source.snapshot();
        assert_eq!(snapshot.duplicates.len(), 1, "a is defined in a.yaml first");
        assert_eq!(snapshot.duplicates[0].1, dir.join("b.yml"));

        fs::write(dir.join("a.yaml"), service("c", "10.96.0.3")).unwrap();
        assert!(source.rescan().unwrap().changed);
        assert_eq!(names(&source), ["c", "b", "a"], "b.yml's copy of a now counts");

        fs::remove_file(dir.join("b.yml")).unwrap();
        assert!(source.rescan().unwrap().changed);
        assert_eq!(names(&source), ["c"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
