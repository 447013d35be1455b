//! `netpol-cni install | uninstall`: put the plugin on a node the way
//! flannel's and Calico's installers put theirs, from a DaemonSet container
//! that mounts the host's CNI directories.
//!
//! - The binary is copied to `--bin-dir` (a temporary file renamed over the
//!   old one, so a runtime never executes half a binary; skipped when the
//!   bytes are the same).
//! - The node's network configuration is the first `.conf`, `.conflist` or
//!   `.json` file of `--conf-dir` in lexical order: the one containerd and
//!   CRI-O use (libcni's `ConfFiles`). Our entry is appended to its `plugins`
//!   (after the plugin that creates the interfaces), or updated in place when
//!   it is there already, so running `install` twice changes nothing. A
//!   single-plugin `.conf`/`.json` becomes a `.conflist` of the same name
//!   holding that plugin and ours, and the old file goes.
//! - Files are rewritten whole, as equivalent JSON (object keys sorted), to a
//!   hidden temporary name that no runtime reads, then renamed into place.
//! - A file that does not parse is an error naming it; nothing is written.
//!
//! `--watch` keeps the entry there: primary plugins rewrite their
//! configuration when their own agent restarts (Calico's and flannel's
//! installers do), which drops our entry and with it enforcement of new pods'
//! first packets while the agent is away. The directory is polled: a rewrite
//! is rare, a poll is a `readdir` and a small read, and polling also sees a
//! directory that was replaced (a new mount) where inotify would not.
//!
//! `uninstall` removes the entry from every configuration in the directory.
//! The binary stays unless asked (`--remove-binary`): the runtime calls `DEL`
//! with the plugin list each pod was created with, so it must find the plugin
//! until those pods are gone.

use std::{
    fmt, fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Map, Value};

/// The plugin's `type`, as runtimes look it up in the bin dir.
pub const PLUGIN_TYPE: &str = "netpol-cni";

/// What can go wrong, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{}: {context}: {source}", path.display())]
    Io {
        path: PathBuf,
        context: &'static str,
        source: std::io::Error,
    },
    #[error("{}: not a CNI network configuration: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error(
        "{}: no network configuration (.conf, .conflist or .json) to chain to; \
         the primary CNI plugin has not written one yet",
        dir.display()
    )]
    NoPrimary { dir: PathBuf },
    #[error(
        "{}: changed while netpol-cni was patching it (another installer?); tried again",
        path.display()
    )]
    Raced { path: PathBuf },
    #[error("{0}")]
    Usage(String),
}

/// Where and with what settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// Our entry in the conflist (`type` is added).
    pub entry: Map<String, Value>,
    pub watch: Option<Duration>,
    /// `install`: wait this long for the primary plugin's configuration.
    pub wait: Duration,
    pub remove_binary: bool,
}

impl Options {
    /// `--bin-dir D --conf-dir D [--bpffs-root P] [--state-dir P]
    /// [--log-file F] [--watch[=SECS]] [--wait SECS] [--remove-binary]`.
    pub fn parse(args: &[String]) -> Result<Self, InstallError> {
        let mut o = Options {
            bin_dir: PathBuf::from("/opt/cni/bin"),
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            entry: Map::new(),
            watch: None,
            wait: Duration::ZERO,
            remove_binary: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (a.as_str(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| InstallError::Usage(format!("{name} needs a value")))
            };
            let secs = |name: &str, v: String| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| InstallError::Usage(format!("{name} {v}: expected seconds")))
            };
            match flag {
                "--bin-dir" => o.bin_dir = value(flag)?.into(),
                "--conf-dir" => o.conf_dir = value(flag)?.into(),
                "--bpffs-root" => {
                    o.entry.insert("bpffsRoot".into(), value(flag)?.into());
                }
                "--state-dir" => {
                    o.entry.insert("stateDir".into(), value(flag)?.into());
                }
                "--log-file" => {
                    o.entry.insert("logFile".into(), value(flag)?.into());
                }
                "--watch" => {
                    o.watch = Some(match inline.clone() {
                        Some(v) => secs(flag, v)?,
                        None => Duration::from_secs(2),
                    })
                }
                "--wait" => o.wait = secs(flag, value(flag)?)?,
                "--remove-binary" => o.remove_binary = true,
                other => return Err(InstallError::Usage(format!("unknown argument {other}"))),
            }
        }
        o.entry.insert("type".into(), PLUGIN_TYPE.into());
        Ok(o)
    }
}

/// What one pass did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The configuration already had our entry, as configured.
    Unchanged(PathBuf),
    /// Our entry was added or updated in this file (and `from` removed when
    /// a single-plugin file was turned into a conflist).
    Patched {
        path: PathBuf,
        from: Option<PathBuf>,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Unchanged(p) => write!(f, "{} already chains netpol-cni", p.display()),
            Outcome::Patched { path, from: None } => {
                write!(f, "{}: netpol-cni chained", path.display())
            }
            Outcome::Patched {
                path,
                from: Some(old),
            } => write!(
                f,
                "{}: netpol-cni chained (converted from {})",
                path.display(),
                old.display()
            ),
        }
    }
}

fn io<'a>(
    path: &'a Path,
    context: &'static str,
) -> impl FnOnce(std::io::Error) -> InstallError + 'a {
    move |source| InstallError::Io {
        path: path.to_owned(),
        context,
        source,
    }
}

/// The configuration files a runtime considers, in the order it does.
pub fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io(dir, "reading the directory"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conf" | "conflist" | "json")
            )
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Writes `bytes` to `path` through a hidden temporary file in the same
/// directory (not a name a runtime reads) and a rename.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.netpol-tmp"));
    let mut f = fs::File::create(&tmp).map_err(io(&tmp, "creating"))?;
    f.write_all(bytes).map_err(io(&tmp, "writing"))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(&tmp, "setting the mode"))?;
    f.sync_all().map_err(io(&tmp, "syncing"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path, "renaming into place"))
}

/// Copies this binary into the bin dir unless the same bytes are there.
/// True if it wrote.
pub fn install_binary(exe: &Path, bin_dir: &Path) -> Result<bool, InstallError> {
    let bytes = fs::read(exe).map_err(io(exe, "reading this binary"))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    if fs::read(&target).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    write_atomically(&target, &bytes, 0o755)?;
    Ok(true)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn parse(path: &Path) -> Result<Map<String, Value>, InstallError> {
    parse_text(
        path,
        &fs::read_to_string(path).map_err(io(path, "reading"))?,
    )
}

fn parse_text(path: &Path, text: &str) -> Result<Map<String, Value>, InstallError> {
    let invalid = |why: String| InstallError::Invalid {
        path: path.to_owned(),
        why,
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("not a JSON object".into())),
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// The conflist form of a configuration file: its `plugins`, or a
/// single-plugin file wrapped as one (CNI spec: `cniVersion` and `name` move
/// up; the rest is the plugin).
fn as_conflist(
    path: &Path,
    mut conf: Map<String, Value>,
) -> Result<(Map<String, Value>, bool), InstallError> {
    let invalid = |why: &str| InstallError::Invalid {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    if let Some(plugins) = conf.get("plugins") {
        if !plugins.is_array() {
            return Err(invalid("`plugins` is not an array"));
        }
        return Ok((conf, false));
    }
    if conf.get("type").and_then(Value::as_str).is_none() {
        return Err(invalid("neither `plugins` nor a plugin `type`"));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.remove(key) {
            list.insert(key.into(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    Ok((list, true))
}

/// One pass of `install` over the configuration directory.
pub fn chain(conf_dir: &Path, entry: &Map<String, Value>) -> Result<Outcome, InstallError> {
    let Some(primary) = conf_files(conf_dir)?.into_iter().next() else {
        return Err(InstallError::NoPrimary {
            dir: conf_dir.to_owned(),
        });
    };
    let original = fs::read_to_string(&primary).map_err(io(&primary, "reading"))?;
    let (mut list, converted) = as_conflist(&primary, parse_text(&primary, &original)?)?;
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .expect("as_conflist checked");
    let ours = Value::Object(entry.clone());
    match plugins.iter().position(is_ours) {
        Some(i) if plugins[i] == ours && !converted => return Ok(Outcome::Unchanged(primary)),
        Some(i) => plugins[i] = ours,
        None => plugins.push(ours),
    }
    let mut text = serde_json::to_string_pretty(&Value::Object(list)).expect("JSON values print");
    text.push('\n');
    // The primary plugin's installer may have rewritten the file since we
    // read it: renaming our patch of the old contents over it would undo
    // that. Check just before (a window of microseconds, not of a poll).
    if fs::read_to_string(&primary).ok().as_deref() != Some(original.as_str()) {
        return Err(InstallError::Raced { path: primary });
    }
    if converted {
        let path = primary.with_extension("conflist");
        write_atomically(&path, text.as_bytes(), 0o644)?;
        fs::remove_file(&primary).map_err(io(&primary, "removing the converted file"))?;
        Ok(Outcome::Patched {
            path,
            from: Some(primary),
        })
    } else {
        write_atomically(&primary, text.as_bytes(), 0o644)?;
        Ok(Outcome::Patched {
            path: primary,
            from: None,
        })
    }
}

/// Removes our entry from every conflist of the directory; the files it
/// changed.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for path in conf_files(conf_dir)? {
        // Files that are not ours to judge (another tool's broken file) are
        // left alone: uninstall must not fail because of them.
        let Ok(mut conf) = parse(&path) else {
            continue;
        };
        let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        if plugins.len() != before {
            let mut text =
                serde_json::to_string_pretty(&Value::Object(conf)).expect("JSON values print");
            text.push('\n');
            write_atomically(&path, text.as_bytes(), 0o644)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// `netpol-cni install ...`: the binary, then the configuration (waiting up
/// to `--wait` for the primary plugin's), then with `--watch` forever.
pub fn install(o: &Options, log: &mut dyn FnMut(String)) -> Result<(), InstallError> {
    let exe = PathBuf::from("/proc/self/exe");
    if install_binary(&exe, &o.bin_dir)? {
        log(format!(
            "installed {}",
            o.bin_dir.join(PLUGIN_TYPE).display()
        ));
    }
    let started = std::time::Instant::now();
    let mut last: Option<Outcome> = None;
    let mut waiting_logged = false;
    loop {
        match chain(&o.conf_dir, &o.entry) {
            Ok(outcome) => {
                let report = match (&outcome, &last) {
                    (Outcome::Unchanged(_), Some(_)) => false,
                    _ => true,
                };
                if report {
                    log(outcome.to_string());
                }
                last = Some(outcome);
                waiting_logged = false;
            }
            Err(InstallError::NoPrimary { .. })
                if o.watch.is_some() || started.elapsed() < o.wait =>
            {
                if !waiting_logged {
                    log(format!(
                        "{}: no network configuration yet; waiting for the primary plugin's",
                        o.conf_dir.display()
                    ));
                    waiting_logged = true;
                }
            }
            Err(e @ InstallError::Raced { .. }) => log(e.to_string()),
            // In watch mode a broken file (another installer's half-written
            // one, a typo) is logged and tried again: the next good version
            // gets the entry.
            Err(e) if o.watch.is_some() => log(format!("{e}; retrying")),
            Err(e) => return Err(e),
        }
        match o.watch {
            Some(every) => std::thread::sleep(every),
            None if last.is_some() => return Ok(()),
            None => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir()
                .join(format!("netpol-cni-install-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            fs::write(&p, text).unwrap();
            p
        }
        fn json(&self, name: &str) -> Value {
            serde_json::from_str(&fs::read_to_string(self.0.join(name)).unwrap()).unwrap()
        }
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entry() -> Map<String, Value> {
        let args: Vec<String> = [
            "--bpffs-root",
            "/sys/fs/bpf/netpol",
            "--log-file=/var/log/n.log",
        ]
        .map(String::from)
        .to_vec();
        Options::parse(&args).unwrap().entry
    }

    const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "1.0.0",
  "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": true, "isDefaultGateway": true}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    #[test]
    fn appends_to_the_first_conflist_in_lexical_order_once() {
        let d = Dir::new("append");
        d.write("10-flannel.conflist", FLANNEL);
        d.write(
            "99-loopback.conf",
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        );
        let out = chain(&d.0, &entry()).unwrap();
        assert_eq!(
            out,
            Outcome::Patched {
                path: d.0.join("10-flannel.conflist"),
                from: None
            }
        );
        let v = d.json("10-flannel.conflist");
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["flannel", "portmap", "netpol-cni"]);
        assert_eq!(
            v["plugins"][2],
            json!({"type": "netpol-cni", "bpffsRoot": "/sys/fs/bpf/netpol", "logFile": "/var/log/n.log"})
        );
        // The rest of the file means what it meant.
        assert_eq!(v["plugins"][0]["delegate"]["hairpinMode"], true);
        assert_eq!(v["name"], "cbr0");
        // The later file is not the runtime's: untouched.
        assert!(d.json("99-loopback.conf").get("plugins").is_none());
        // Twice: nothing changes, byte for byte.
        let bytes = fs::read(d.0.join("10-flannel.conflist")).unwrap();
        assert_eq!(
            chain(&d.0, &entry()).unwrap(),
            Outcome::Unchanged(d.0.join("10-flannel.conflist"))
        );
        assert_eq!(fs::read(d.0.join("10-flannel.conflist")).unwrap(), bytes);
        // No temporary file is left for a runtime to trip over.
        assert_eq!(d.names(), ["10-flannel.conflist", "99-loopback.conf"]);
    }

    #[test]
    fn an_entry_with_other_settings_is_updated_not_duplicated() {
        let d = Dir::new("update");
        d.write(
            "10-x.conflist",
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"ptp"},
               {"type":"netpol-cni","bpffsRoot":"/old"}]}"#,
        );
        chain(&d.0, &entry()).unwrap();
        let v = d.json("10-x.conflist");
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[1]["bpffsRoot"], "/sys/fs/bpf/netpol");
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let d = Dir::new("convert");
        d.write(
            "10-bridge.conf",
            r#"{"cniVersion":"0.4.0","name":"br","type":"bridge","bridge":"cni0",
               "ipam":{"type":"host-local","subnet":"10.1.0.0/24"}}"#,
        );
        let out = chain(&d.0, &entry()).unwrap();
        assert_eq!(
            out,
            Outcome::Patched {
                path: d.0.join("10-bridge.conflist"),
                from: Some(d.0.join("10-bridge.conf"))
            }
        );
        assert_eq!(d.names(), ["10-bridge.conflist"]);
        let v = d.json("10-bridge.conflist");
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["name"], "br");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][0]["ipam"]["subnet"], "10.1.0.0/24");
        assert!(v["plugins"][0].get("cniVersion").is_none());
        assert_eq!(v["plugins"][1]["type"], "netpol-cni");
    }

    #[test]
    fn a_broken_primary_is_named_and_left_alone() {
        let d = Dir::new("broken");
        let p = d.write("10-a.conflist", "{\"plugins\": [");
        let err = chain(&d.0, &entry()).unwrap_err();
        assert!(
            matches!(&err, InstallError::Invalid { path, .. } if path == &p),
            "{err}"
        );
        assert!(err.to_string().contains("10-a.conflist"), "{err}");
        assert_eq!(fs::read_to_string(&p).unwrap(), "{\"plugins\": [");
        d.write("10-a.conflist", r#"{"name":"a","plugins":{"type":"x"}}"#);
        let err = chain(&d.0, &entry()).unwrap_err();
        assert!(
            err.to_string().contains("`plugins` is not an array"),
            "{err}"
        );
    }

    #[test]
    fn no_configuration_is_a_clear_error() {
        let d = Dir::new("empty");
        d.write("README", "not a config");
        let err = chain(&d.0, &entry()).unwrap_err();
        assert!(matches!(err, InstallError::NoPrimary { .. }), "{err}");
        assert!(err.to_string().contains("primary CNI plugin"), "{err}");
    }

    #[test]
    fn uninstall_removes_the_entry_everywhere_and_only_it() {
        let d = Dir::new("uninstall");
        d.write("10-flannel.conflist", FLANNEL);
        chain(&d.0, &entry()).unwrap();
        d.write(
            "20-other.conflist",
            r#"{"name":"o","plugins":[{"type":"ptp"},{"type":"netpol-cni"}]}"#,
        );
        d.write("30-junk.conf", "not json");
        let changed = unchain(&d.0).unwrap();
        assert_eq!(
            changed,
            [
                d.0.join("10-flannel.conflist"),
                d.0.join("20-other.conflist")
            ]
        );
        let v = d.json("10-flannel.conflist");
        let expected: Value = serde_json::from_str(FLANNEL).unwrap();
        assert_eq!(v, expected);
        assert_eq!(
            d.json("20-other.conflist")["plugins"],
            json!([{"type": "ptp"}])
        );
        assert_eq!(
            fs::read_to_string(d.0.join("30-junk.conf")).unwrap(),
            "not json"
        );
    }

    #[test]
    fn the_binary_is_replaced_only_when_it_differs() {
        let d = Dir::new("binary");
        let exe = d.write("source-exe", "v1");
        let bin = d.0.join("bin");
        fs::create_dir(&bin).unwrap();
        assert!(install_binary(&exe, &bin).unwrap());
        assert!(!install_binary(&exe, &bin).unwrap());
        let installed = bin.join(PLUGIN_TYPE);
        assert_eq!(fs::read_to_string(&installed).unwrap(), "v1");
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        fs::write(&exe, "v2").unwrap();
        assert!(install_binary(&exe, &bin).unwrap());
        assert_eq!(fs::read_to_string(&installed).unwrap(), "v2");
    }

    #[test]
    fn arguments_are_checked() {
        let parse =
            |a: &[&str]| Options::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(matches!(parse(&["--bogus"]), Err(InstallError::Usage(_))));
        assert!(matches!(
            parse(&["--conf-dir"]),
            Err(InstallError::Usage(_))
        ));
        assert!(matches!(
            parse(&["--watch=soon"]),
            Err(InstallError::Usage(_))
        ));
        let o = parse(&["--watch", "--conf-dir", "/x"]).unwrap();
        assert_eq!(o.watch, Some(Duration::from_secs(2)));
        assert_eq!(o.conf_dir, PathBuf::from("/x"));
        assert_eq!(
            o.entry,
            json!({"type": "netpol-cni"}).as_object().unwrap().clone()
        );
    }
}
