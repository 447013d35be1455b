//! netpol-cni: a chained CNI plugin that closes the window between a pod's
//! veth appearing and the agent attaching to it.
//!
//! Listed after the plugin that creates the pod's interfaces (bridge, ptp,
//! ...), it runs on ADD before the runtime starts the container: it puts the
//! agent's TC programs on the pod's host veth through links pinned where the
//! agent pins its own, and answers with the previous result unchanged. With
//! no endpoint entry for the veth, the datapath drops the pod's traffic
//! (`no_endpoint`) until the agent knows the pod, so the pod is enforced from
//! its first packet even when the agent is starting, busy or down.
//!
//! - ADD: attach, record the attachment, print `prevResult` as it came.
//! - DEL: remove the link pins (idempotent: whatever is gone already is fine).
//! - CHECK: fail unless both links are pinned and attached to the veth.
//! - VERSION, STATUS, GC as in CNI 1.1.
//!
//! On a node without netpol (no pinned maps under `bpffsRoot`) every command
//! passes through and logs that it did.
//!
//! Run with arguments, it installs itself instead (`netpol-cni install`,
//! `netpol-cni uninstall`; see [`install`]): a runtime calls plugins without
//! arguments, with `CNI_COMMAND` in the environment.

mod attach;
mod bpf;
mod cni;
mod host;
mod install;
mod log;
mod state;

use std::{io::Read as _, process::ExitCode, time::Instant};

use netpol_agent::pins::Pins;

use crate::{
    cni::{CniError, Command, Env, LATEST_VERSION, NetConf, SUPPORTED_VERSIONS, code},
    host::HostVeth,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(cmd) = args.first() {
        return installer(cmd, &args[1..]);
    }
    let mut stdin = String::new();
    let read = std::io::stdin().read_to_string(&mut stdin);
    let env = Env::from_vars(|k| std::env::var(k).ok());
    // Errors are reported in the configuration's version when it has one.
    let version = serde_json::from_str::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_owned());
    let result = match read {
        Ok(_) => env.and_then(|env| run(&env, &stdin, &version)),
        Err(e) => Err(CniError::new(code::IO, "reading stdin", e)),
    };
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            log::error(format_args!("{e}"));
            println!("{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// `netpol-cni install|uninstall [options]`, from a DaemonSet container.
fn installer(cmd: &str, args: &[String]) -> ExitCode {
    let say = |line: String| eprintln!("netpol-cni {cmd}: {line}");
    let result = install::Options::parse(args).and_then(|o| match cmd {
        "install" => install::install(&o, &mut |l| say(l)),
        "uninstall" => {
            for path in install::unchain(&o.conf_dir)? {
                say(format!("{}: netpol-cni removed", path.display()));
            }
            if o.remove_binary {
                let bin = o.bin_dir.join(install::PLUGIN_TYPE);
                match std::fs::remove_file(&bin) {
                    Ok(()) => say(format!("removed {}", bin.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(install::InstallError::Io {
                            path: bin,
                            context: "removing the binary",
                            source,
                        });
                    }
                }
            }
            Ok(())
        }
        other => Err(install::InstallError::Usage(format!(
            "unknown command {other}: expected install or uninstall \
             (as a CNI plugin, it is run without arguments)"
        ))),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// One command; `Some` is what goes on stdout.
fn run(env: &Env, stdin: &str, version: &str) -> Result<Option<String>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(cni::version_result(version)));
    }
    let conf = NetConf::parse(stdin)?;
    log::init(
        conf.log_file.clone(),
        format!(
            "{} network={} container={} ifname={}",
            env.command.as_str(),
            conf.name,
            env.container_id,
            env.ifname
        ),
    );
    let pins = Pins::new(&conf.bpffs_root);
    let installed = attach::installed(&pins);
    let not_installed = || {
        log::info(format_args!(
            "netpol is not installed on this node (no pinned maps under {}): passing through",
            conf.bpffs_root.display()
        ))
    };
    match env.command {
        Command::Version => unreachable!("answered above"),
        Command::Add => {
            let (raw, prev) = conf.require_prev_result()?;
            if !installed {
                not_installed();
                return Ok(Some(raw.get().to_owned()));
            }
            add(env, &conf, &pins, &prev.host_interfaces())?;
            Ok(Some(raw.get().to_owned()))
        }
        Command::Del => {
            if installed {
                del(env, &conf, &pins)?;
            } else {
                not_installed();
            }
            state::remove(&conf.state_dir, &env.container_id, &env.ifname)
                .map_err(|e| CniError::new(code::IO, "removing the attachment record", e))?;
            Ok(None)
        }
        Command::Check => {
            let (_, prev) = conf.require_prev_result()?;
            if !installed {
                not_installed();
                return Ok(None);
            }
            let veth = find_veth(env, &prev.host_interfaces())?;
            attach::check(&pins, &veth)?;
            Ok(None)
        }
        // Ready whenever invoked: with netpol installed ADD can attach (the
        // programs come from pinned links or are loaded), without it ADD
        // passes through.
        Command::Status => Ok(None),
        Command::Gc => {
            gc(&conf, &pins);
            Ok(None)
        }
    }
}

fn find_veth(env: &Env, prev_host: &[&str]) -> Result<HostVeth, CniError> {
    host::find(env.netns.as_deref(), &env.ifname, prev_host).map_err(|why| {
        CniError::new(
            code::NO_HOST_VETH,
            format!("cannot find the host-side veth of {}", env.ifname),
            why,
        )
    })
}

fn add(env: &Env, conf: &NetConf, pins: &Pins, prev_host: &[&str]) -> Result<(), CniError> {
    let t0 = Instant::now();
    if let Some(netns) = &env.netns
        && !netns.exists()
    {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("CNI_NETNS {} does not exist", netns.display()),
            "the sandbox is gone",
        ));
    }
    let veth = find_veth(env, prev_host)?;
    let how = attach::attach(pins, &veth)?;
    state::save(
        &conf.state_dir,
        &state::Record {
            container_id: env.container_id.clone(),
            ifname: env.ifname.clone(),
            host_ifindex: veth.ifindex,
            host_veth: veth.name.clone(),
        },
    )
    .map_err(|e| CniError::new(code::IO, "recording the attachment", e))?;
    log::info(format_args!(
        "{} (ifindex {}) carries netpol's programs ({}) after {:?}; denied until the agent knows the pod",
        veth.name,
        veth.ifindex,
        match how {
            attach::Attached::Already => "already pinned",
            attach::Attached::FromLinks => "attached the agent's running programs",
            attach::Attached::Loaded => "no pinned link to take them from: loaded",
        },
        t0.elapsed()
    ));
    Ok(())
}

/// The link pins of this attachment: of the veth if it is still there (the
/// runtime calls chained plugins' DEL in reverse order, before the plugin
/// that deletes the veth), else of the recorded ifindex, unless that ifindex
/// now belongs to another interface.
fn del(env: &Env, conf: &NetConf, pins: &Pins) -> Result<(), CniError> {
    let prev = conf.prev_result().unwrap_or_default();
    let netns = env.netns.as_deref().filter(|p| p.exists());
    let ifindex = match host::find(netns, &env.ifname, &prev.host_interfaces()) {
        Ok(veth) => Some(veth.ifindex),
        Err(why) => match state::load(&conf.state_dir, &env.container_id, &env.ifname) {
            Some(r) => match host::name_of(r.host_ifindex) {
                Some(name) if name != r.host_veth && attach::any_live(pins, r.host_ifindex) => {
                    log::info(format_args!(
                        "ifindex {} is {name} now, not {}: leaving its links",
                        r.host_ifindex, r.host_veth
                    ));
                    None
                }
                _ => Some(r.host_ifindex),
            },
            None => {
                log::info(format_args!(
                    "nothing to remove: no host veth ({why}) and no record of one"
                ));
                None
            }
        },
    };
    if let Some(ifindex) = ifindex {
        attach::detach(pins, ifindex)?;
        log::info(format_args!("removed the link pins of ifindex {ifindex}"));
    }
    Ok(())
}

/// Forget attachments the runtime no longer has. Their link pins go when
/// their interface is gone; a live one stays (its veth still exists, and the
/// agent removes its links when the veth goes).
fn gc(conf: &NetConf, pins: &Pins) {
    let Some(valid) = &conf.valid_attachments else {
        return;
    };
    for r in state::all(&conf.state_dir) {
        if valid
            .iter()
            .any(|v| v.container_id == r.container_id && v.ifname == r.ifname)
        {
            continue;
        }
        if attach::installed(pins) && !attach::any_live(pins, r.host_ifindex) {
            let _ = attach::detach(pins, r.host_ifindex);
        }
        let _ = state::remove(&conf.state_dir, &r.container_id, &r.ifname);
        log::info(format_args!(
            "forgot the attachment of container {} ifname {}",
            r.container_id, r.ifname
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GC forgets the attachments the runtime no longer lists and keeps the
    /// others (no netpol here, so no pins to look at).
    #[test]
    fn gc_forgets_attachments_the_runtime_no_longer_has() {
        let dir = std::env::temp_dir().join(format!("netpol-cni-gc-{}", std::process::id()));
        for id in ["keep", "gone"] {
            state::save(
                &dir,
                &state::Record {
                    container_id: id.into(),
                    ifname: "eth0".into(),
                    host_ifindex: 1_000_000,
                    host_veth: format!("veth{id}"),
                },
            )
            .unwrap();
        }
        let conf = NetConf::parse(&format!(
            r#"{{"cniVersion": "1.1.0", "name": "n", "bpffsRoot": "/nonexistent/netpol",
                "stateDir": {:?},
                "cni.dev/valid-attachments": [{{"containerID": "keep", "ifname": "eth0"}}]}}"#,
            dir.display().to_string()
        ))
        .unwrap();
        gc(&conf, &Pins::new(&conf.bpffs_root));
        let left: Vec<String> = state::all(&dir)
            .into_iter()
            .map(|r| r.container_id)
            .collect();
        assert_eq!(left, ["keep"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
