//! `--source dir:<path>`: a directory of manifests (the lab writes Namespace,
//! Pod and Node objects there; users drop NetworkPolicy manifests in),
//! watched by polling modification times so a change is enforced within a
//! second. Only changed files are parsed again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::SystemTime,
};

use crate::{
    convert,
    manifest::{self, ManifestError, Object},
    model::Cluster,
};

#[derive(Debug)]
struct FileEntry {
    stamp: (SystemTime, u64),
    objects: Vec<Object>,
    errors: Vec<ManifestError>,
}

/// Where cluster state comes from (a manifests directory, or the
/// Kubernetes API). The run loop polls it and compiles its snapshots.
pub trait ClusterSource: Send {
    /// Look for changes; true if the cluster may have changed since the
    /// last call. An error leaves the previous state in force.
    fn poll(&mut self) -> std::io::Result<bool>;
    /// Incremented on every change.
    fn revision(&self) -> u64;
    /// The cluster as the source describes it now.
    fn snapshot(&self) -> Snapshot;
    /// Whether the source has delivered a complete state (for the API: every
    /// initial list is done). Until then the agent keeps what it enforces
    /// and does not report ready.
    fn ready(&self) -> bool {
        true
    }
    /// For logs: what this source reads.
    fn describe(&self) -> String;
}

/// The directory and what its files held when last read.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileEntry>,
    revision: u64,
}

/// The cluster a source describes, with every problem found reading it.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub cluster: Cluster,
    /// Files or documents that did not parse, and objects with invalid
    /// fields (an invalid policy still isolates what it selects).
    pub errors: Vec<String>,
}

fn is_manifest(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    ) && !p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            revision: 0,
        }
    }
}

impl ClusterSource for DirSource {
    fn describe(&self) -> String {
        format!("dir:{}", self.dir.display())
    }

    /// Incremented every time the directory's content changes.
    fn revision(&self) -> u64 {
        self.revision
    }

    /// Look at the directory; re-read changed files. Returns whether
    /// anything changed. A directory that cannot be listed is an error (the
    /// caller keeps enforcing what it had).
    fn poll(&mut self) -> std::io::Result<bool> {
        let mut seen = BTreeMap::new();
        for e in std::fs::read_dir(&self.dir)? {
            let e = e?;
            let path = e.path();
            if !is_manifest(&path) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            seen.insert(path, stamp);
        }
        let mut changed = false;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            self.files.remove(&p);
            changed = true;
        }
        for (path, stamp) in seen {
            if self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let (objects, errors) = match std::fs::read_to_string(&path) {
                Ok(text) => manifest::parse(&path, &text),
                // Vanished between listing and reading: next poll sees it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => (
                    Vec::new(),
                    vec![ManifestError {
                        file: path.clone(),
                        line: 0,
                        message: e.to_string(),
                    }],
                ),
            };
            self.files.insert(
                path,
                FileEntry {
                    stamp,
                    objects,
                    errors,
                },
            );
            changed = true;
        }
        if changed {
            self.revision += 1;
        }
        Ok(changed)
    }

    /// The cluster as the files describe it now.
    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for f in self.files.values() {
            snap.errors.extend(f.errors.iter().map(|e| e.to_string()));
            for o in &f.objects {
                match o {
                    Object::Namespace(ns) => match convert::namespace(ns) {
                        Ok(ns) => snap.cluster.upsert_namespace(ns),
                        Err(e) => snap.errors.push(e.to_string()),
                    },
                    Object::Pod(p) => match convert::pod(p) {
                        Ok(c) => {
                            snap.errors.extend(c.errors.iter().map(|e| e.to_string()));
                            snap.cluster.upsert_pod(c.value);
                        }
                        Err(e) => snap.errors.push(e.to_string()),
                    },
                    Object::NetworkPolicy(np) => match convert::network_policy(np) {
                        Ok(c) => {
                            snap.errors.extend(c.errors.iter().map(|e| e.to_string()));
                            snap.cluster.upsert_policy(c.value);
                        }
                        Err(e) => snap.errors.push(e.to_string()),
                    },
                    Object::Node(_) => {}
                }
            }
        }
        snap
    }
}
