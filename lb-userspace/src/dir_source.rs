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
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::{
    manifest::{ManifestError, Object, ParsedFile, parse_manifests},
    model::{Changes, NodeNames, ObjectRef, ParsedService, ParsedSlice},
};

const RACY_WINDOW: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// What a rescan found: the objects that changed, for the model, and
/// what files that changed hold that cannot be used, for the caller to log.
#[derive(Default)]
pub struct Rescan {
    pub changes: Changes,
    /// A Node was added, changed or removed (read with `DirSource::node`).
    pub nodes_changed: bool,
    /// The first scan that read the directory.
    pub first: bool,
    pub errors: Vec<ManifestError>,
    pub skipped: Vec<String>,
}

pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Known>,
    /// The objects served, each from the first file (by name) defining it.
    served: BTreeMap<ObjectRef, (PathBuf, Object)>,
    /// Objects defined in more than one file: (object, ignored file, kept file).
    duplicates: Vec<(ObjectRef, PathBuf, PathBuf)>,
    /// When each served Service was first served: its age, when its
    /// manifest has no creationTimestamp, so that of two Services claiming
    /// one address the one served first keeps it, as the older would in a
    /// cluster. A Service first seen is as old as its file's last change:
    /// after a restart, the file changed least recently is the older, so a
    /// Service whose file was edited after a newcomer's was added loses a
    /// shared address to it then (these ages live only in memory).
    first_served: BTreeMap<ObjectRef, Time>,
    nodes: NodeNames,
    /// A scan read the directory.
    scanned: bool,
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
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            served: BTreeMap::new(),
            duplicates: Vec::new(),
            first_served: BTreeMap::new(),
            nodes: NodeNames::default(),
            scanned: false,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks for added, changed and removed files, parses what changed and
    /// says which objects changed.
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
        let mut rescan = Rescan { first: !std::mem::replace(&mut self.scanned, true), ..Rescan::default() };
        let before = self.files.len();
        self.files.retain(|path, _| seen.contains_key(path));
        let mut changed = self.files.len() != before;
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
            changed = true;
        }
        if changed {
            (rescan.changes, rescan.nodes_changed) = self.serve();
        }
        Ok(rescan)
    }

    /// Decides again which file's copy of each object is served (the
    /// first file by name wins a duplicate) and returns the objects whose
    /// served copy is new, replaced or gone. Files not reparsed keep their
    /// objects, so comparing identities finds the changes.
    fn serve(&mut self) -> (Changes, bool) {
        let mut served: BTreeMap<ObjectRef, (PathBuf, Object)> = BTreeMap::new();
        self.duplicates.clear();
        for (path, known) in &self.files {
            for object in &known.parsed.objects {
                let reference = object.object_ref();
                if let Some((first, _)) = served.get(&reference) {
                    self.duplicates.push((reference, path.clone(), first.clone()));
                    continue;
                }
                served.insert(reference, (path.clone(), object.clone()));
            }
        }
        let mut changes = Changes::default();
        let mut nodes_changed = false;
        let key = |reference: &ObjectRef| (reference.namespace.clone(), reference.name.clone());
        let now = k8s_openapi::jiff::Timestamp::now();
        // File times come from a coarse clock: a Service first seen now is
        // newer than every one seen before, whatever its file's time says.
        let floor = self.first_served.values().map(|t| t.0).max();
        let floor = floor.map(|newest| newest + k8s_openapi::jiff::SignedDuration::from_nanos(1));
        self.first_served.retain(|reference, _| served.contains_key(reference));
        for (reference, (path, object)) in &served {
            let same = match (object, self.served.get(reference).map(|(_, o)| o)) {
                (Object::Service(now), Some(Object::Service(before))) => Arc::ptr_eq(now, before),
                (Object::EndpointSlice(now), Some(Object::EndpointSlice(before))) => Arc::ptr_eq(now, before),
                (Object::Node(now), Some(Object::Node(before))) => Arc::ptr_eq(now, before),
                _ => false,
            };
            if same {
                continue;
            }
            match object {
                Object::Service(service) => {
                    let changed = self.files.get(path).and_then(|known| known.print.modified);
                    let changed = changed.and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok());
                    let file_age = changed.map_or(now, |changed| changed.min(now));
                    let age = floor.map_or(file_age, |floor| file_age.max(floor));
                    let first_served = self.first_served.entry(reference.clone()).or_insert(Time(age)).clone();
                    let parsed = match service.metadata.creation_timestamp {
                        Some(_) => ParsedService::parse(service),
                        None => {
                            let mut aged = (**service).clone();
                            aged.metadata.creation_timestamp = Some(first_served);
                            ParsedService::parse(&aged)
                        }
                    };
                    changes.service(key(reference), Some(parsed))
                }
                Object::EndpointSlice(slice) => {
                    changes.slice(key(reference), Some(ParsedSlice::parse(slice, &mut self.nodes)))
                }
                Object::Node(_) => nodes_changed = true,
            }
        }
        for (reference, (_, object)) in &self.served {
            if served.contains_key(reference) {
                continue;
            }
            match object {
                Object::Service(_) => changes.service(key(reference), None),
                Object::EndpointSlice(_) => changes.slice(key(reference), None),
                Object::Node(_) => nodes_changed = true,
            }
        }
        self.served = served;
        (changes, nodes_changed)
    }

    /// The Node named `name`, if a file defines it.
    pub fn node(&self, name: &str) -> Option<&k8s_openapi::api::core::v1::Node> {
        match self.served.get(&crate::manifest::node_ref(name)) {
            Some((_, Object::Node(node))) => Some(node),
            _ => None,
        }
    }

    /// The file an object is served from.
    pub fn origin(&self, object: &ObjectRef) -> Option<&Path> {
        self.served.get(object).map(|(path, _)| path.as_path())
    }

    /// Objects defined in more than one file: (object, ignored file, kept file).
    pub fn duplicates(&self) -> &[(ObjectRef, PathBuf, PathBuf)] {
        &self.duplicates
    }

    /// The names of the Services served, in order.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.served.iter().filter(|(r, _)| r.kind == "Service").map(|(r, _)| r.name.as_str())
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

    fn names(source: &DirSource) -> Vec<&str> {
        source.service_names().collect()
    }

    /// How many objects a rescan says changed.
    fn changed(source: &mut DirSource) -> usize {
        source.rescan().unwrap().changes.len()
    }

    #[test]
    fn follows_files_being_added_changed_and_deleted() {
        let dir = std::env::temp_dir().join(format!("lb-dirsource-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut source = DirSource::new(&dir);
        let first = source.rescan().unwrap();
        assert!(first.first && first.changes.is_empty(), "the first scan counts, though it finds nothing");
        assert!(!source.rescan().unwrap().first);

        fs::write(dir.join("a.yaml"), service("a", "10.96.0.1")).unwrap();
        fs::write(dir.join(".a.yaml.swp"), "not: yaml: at all: [").unwrap();
        fs::write(dir.join("notes.txt"), "ignored").unwrap();
        assert_eq!(changed(&mut source), 1);
        assert_eq!(names(&source), ["a"]);
        assert_eq!(changed(&mut source), 0, "nothing changed since");

        fs::write(dir.join("b.yml"), service("b", "10.96.0.2") + "---\n" + &service("a", "10.96.0.9")).unwrap();
        assert_eq!(changed(&mut source), 1, "only b is new: a.yaml's a is still served");
        assert_eq!(names(&source), ["a", "b"]);
        assert_eq!(source.duplicates().len(), 1, "a is defined in a.yaml first");
        assert_eq!(source.duplicates()[0].1, dir.join("b.yml"));

        fs::write(dir.join("a.yaml"), service("c", "10.96.0.3")).unwrap();
        assert_eq!(changed(&mut source), 2, "c is new, and b.yml's copy of a now counts");
        assert_eq!(names(&source), ["a", "b", "c"]);
        let origin = |name: &str| {
            source.origin(&ObjectRef { kind: "Service".into(), namespace: "default".into(), name: name.into() })
        };
        assert_eq!(origin("a"), Some(dir.join("b.yml").as_path()));

        fs::remove_file(dir.join("b.yml")).unwrap();
        assert_eq!(changed(&mut source), 2, "a and b are gone");
        assert_eq!(names(&source), ["c"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn of_two_services_claiming_one_address_the_one_served_first_keeps_it() {
        let dir = std::env::temp_dir().join(format!("lb-dirsource-age-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut source = DirSource::new(&dir);
        let (mut model, options) = (crate::model::Model::default(), crate::model::ModelOptions::default());
        fs::write(dir.join("z.yaml"), service("zz-live", "10.96.0.1")).unwrap();
        model.update(source.rescan().unwrap().changes, &options);
        // A newcomer whose name sorts first, in a file that sorts first.
        fs::write(dir.join("a.yaml"), service("aa-new", "10.96.0.1")).unwrap();
        let changed = model.update(source.rescan().unwrap().changes, &options);
        assert!(changed.frontends.is_empty(), "the live Service keeps its frontend");
        assert_eq!(model.desired().values().next().unwrap().name, "default/zz-live:");
        let errors: Vec<String> = model.errors().iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            ["Service default/aa-new: spec.clusterIP: 10.96.0.1:80/TCP is already served for default/zz-live:"]
        );
        // Editing the live one keeps its age.
        fs::write(dir.join("z.yaml"), service("zz-live", "10.96.0.1").replace("port: 80", "port: 80, name: web"))
            .unwrap();
        model.update(source.rescan().unwrap().changes, &options);
        assert_eq!(model.desired().values().next().unwrap().name, "default/zz-live:web");
        fs::remove_dir_all(&dir).unwrap();
    }
}
