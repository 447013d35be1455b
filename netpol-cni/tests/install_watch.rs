//! `netpol-cni install --watch` as the DaemonSet runs it: it waits for the
//! primary plugin's configuration, chains itself, and chains itself again
//! when the primary plugin rewrites its file without the entry (as flannel's
//! and Calico's installers do when their agent restarts). No root needed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_netpol-cni");

const FLANNEL: &str = r#"{"name":"cbr0","cniVersion":"1.0.0",
  "plugins":[{"type":"flannel","delegate":{"isDefaultGateway":true}},{"type":"portmap"}]}"#;

struct Installer(Child);
impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn types(path: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    v["plugins"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["type"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn watch_chains_into_a_late_primary_and_again_after_a_rewrite() {
    let root: PathBuf =
        std::env::temp_dir().join(format!("netpol-cni-watch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let (bin, conf) = (root.join("bin"), root.join("net.d"));
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir_all(&conf).unwrap();
    let _installer = Installer(
        Command::new(BIN)
            .args([
                "install",
                "--watch=0.05",
                "--bpffs-root",
                "/sys/fs/bpf/netpol",
            ])
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .stdin(Stdio::null())
            .spawn()
            .expect("run netpol-cni install"),
    );
    // The binary goes in first, byte for byte this one.
    wait_for("the binary installed", || {
        fs::read(bin.join("netpol-cni")).is_ok_and(|b| b == fs::read(BIN).unwrap())
    });
    // The primary plugin writes its configuration after netpol's installer started.
    let list = conf.join("10-flannel.conflist");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!list.exists());
    fs::write(&list, FLANNEL).unwrap();
    wait_for("netpol-cni chained into the late primary", || {
        types(&list) == ["flannel", "portmap", "netpol-cni"]
    });
    // flannel restarts and writes its file again, without our entry.
    fs::write(&list, FLANNEL).unwrap();
    wait_for("netpol-cni chained again after the rewrite", || {
        types(&list) == ["flannel", "portmap", "netpol-cni"]
    });
    // Uninstall takes it out again and leaves flannel's configuration as it was.
    drop(_installer);
    let out = Command::new(BIN)
        .args(["uninstall", "--remove-binary"])
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .output()
        .expect("run netpol-cni uninstall");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(types(&list), ["flannel", "portmap"]);
    assert!(!bin.join("netpol-cni").exists());
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_one_shot_install_without_a_configuration_fails_clearly() {
    let root: PathBuf =
        std::env::temp_dir().join(format!("netpol-cni-oneshot-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("net.d")).unwrap();
    let out = Command::new(BIN)
        .args(["install", "--wait", "0.2"])
        .arg("--bin-dir")
        .arg(root.join("bin"))
        .arg("--conf-dir")
        .arg(root.join("net.d"))
        .output()
        .expect("run netpol-cni install");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no network configuration"), "{err}");
    assert!(err.contains("net.d"), "{err}");
    fs::remove_dir_all(&root).unwrap();
}

/// deploy/base/daemonset.yaml's install-cni container: a native sidecar whose `--bin-dir` and
/// `--conf-dir` are the mounts of the host's /opt/cni/bin and /etc/cni/net.d, and whose
/// command, run here with those two directories moved to a scratch place and without
/// `--watch`, chains the plugin with the agent's bpffs root.
#[test]
fn the_daemonsets_installer_works_as_written() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml");
    let ds: serde_yaml::Value =
        serde_yaml::from_str(&fs::read_to_string(&path).unwrap()).expect("daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    let c = pod["initContainers"]
        .as_sequence()
        .and_then(|s| s.iter().find(|c| c["name"] == "install-cni"))
        .expect("an install-cni init container");
    assert_eq!(
        c["restartPolicy"], "Always",
        "a native sidecar (keeps --watch running)"
    );
    let command: Vec<String> = c["command"]
        .as_sequence()
        .expect("command")
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    assert!(command[0].ends_with("/netpol-cni"), "{command:?}");
    assert_eq!(command[1], "install");
    assert!(command.contains(&"--watch".to_owned()), "{command:?}");
    let value = |flag: &str| -> String {
        let i = command
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag}"));
        command[i + 1].clone()
    };
    // Each directory flag is the mount of the right host path.
    for (flag, host) in [
        ("--bin-dir", "/opt/cni/bin"),
        ("--conf-dir", "/etc/cni/net.d"),
    ] {
        let mount = c["volumeMounts"]
            .as_sequence()
            .and_then(|m| {
                m.iter()
                    .find(|m| m["mountPath"].as_str() == Some(&value(flag)))
            })
            .unwrap_or_else(|| panic!("{flag} {} is not a mount", value(flag)));
        let volume = pod["volumes"]
            .as_sequence()
            .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
            .expect("the mount's volume");
        assert_eq!(volume["hostPath"]["path"], host, "{flag}");
    }
    // The agent's container mounts the bpffs the plugin is pointed at.
    assert_eq!(value("--bpffs-root"), "/sys/fs/bpf/netpol");

    let root: PathBuf = std::env::temp_dir().join(format!("netpol-cni-ds-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let (bin, conf) = (root.join("bin"), root.join("net.d"));
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir_all(&conf).unwrap();
    let list = conf.join("10-flannel.conflist");
    fs::write(&list, FLANNEL).unwrap();
    let mut args: Vec<String> = command[2..]
        .iter()
        .filter(|a| *a != "--watch")
        .cloned()
        .collect();
    for (flag, dir) in [("--bin-dir", &bin), ("--conf-dir", &conf)] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = dir.display().to_string();
    }
    let out = Command::new(BIN)
        .arg("install")
        .args(&args)
        .output()
        .expect("run the installer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(types(&list), ["flannel", "portmap", "netpol-cni"]);
    let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&list).unwrap()).unwrap();
    assert_eq!(v["plugins"][2]["bpffsRoot"], "/sys/fs/bpf/netpol");
    assert!(bin.join("netpol-cni").exists());
    fs::remove_dir_all(&root).unwrap();
}
