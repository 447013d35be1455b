//! What ADD attached, per attachment (container id, pod-side ifname), so that
//! a DEL or GC that comes after the sandbox and the veth are gone still knows
//! which link pins were this pod's. Kept under a tmpfs (`/run` by default):
//! ifindexes do not survive a reboot either.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub host_ifindex: u32,
    pub host_veth: String,
}

/// One file per attachment; the name keeps only characters that are safe in
/// a file name (container ids are hex, ifnames are short words).
pub fn path(dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    dir.join(format!("{}_{}.json", clean(container_id), clean(ifname)))
}

pub fn save(dir: &Path, r: &Record) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = path(dir, &r.container_id, &r.ifname);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(r).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, &path)
}

pub fn load(dir: &Path, container_id: &str, ifname: &str) -> Option<Record> {
    let text = std::fs::read(path(dir, container_id, ifname)).ok()?;
    serde_json::from_slice(&text).ok()
}

pub fn remove(dir: &Path, container_id: &str, ifname: &str) -> io::Result<()> {
    match std::fs::remove_file(path(dir, container_id, ifname)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Every record in `dir`.
pub fn all(dir: &Path) -> Vec<Record> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_remove_is_idempotent() {
        let dir = std::env::temp_dir().join(format!("netpol-cni-state-{}", std::process::id()));
        let r = Record {
            container_id: "abc/../x".into(),
            ifname: "eth0".into(),
            host_ifindex: 7,
            host_veth: "veth1".into(),
        };
        save(&dir, &r).unwrap();
        assert!(path(&dir, &r.container_id, &r.ifname).starts_with(&dir));
        assert_eq!(load(&dir, "abc/../x", "eth0"), Some(r.clone()));
        assert_eq!(all(&dir), [r]);
        remove(&dir, "abc/../x", "eth0").unwrap();
        remove(&dir, "abc/../x", "eth0").unwrap();
        assert_eq!(load(&dir, "abc/../x", "eth0"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
