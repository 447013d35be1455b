//! nginx (Debian's `nginx-light`) inside a pod's network namespace, serving
//! files of given sizes from a directory of its own, with a configuration
//! written for the benchmark (one worker by default, no access log,
//! sendfile, a listen backlog of 4096).

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use netpol_lab::{netns_command, run_in_netns};

/// The URL path of the file of `size` bytes.
pub fn file_path(size: usize) -> String {
    format!("/{size}.bin")
}

/// A running nginx; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
}

/// The nginx binary, or an error that says how to install it.
pub fn nginx_binary() -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/local/sbin", "/usr/bin"] {
        let p = Path::new(dir).join("nginx");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("nginx is not installed: `apt-get install nginx-light` (`cargo xtask setup` does it)")
}

impl Nginx {
    /// Starts nginx in the netns at `netns` listening on `port` (all
    /// addresses), serving one file per size under `dir` (created; its
    /// contents are replaced). Returns once it accepts connections.
    pub fn start(
        netns: &Path,
        dir: &Path,
        sizes: &[usize],
        port: u16,
        workers: usize,
    ) -> Result<Nginx> {
        let bin = nginx_binary()?;
        let _ = std::fs::remove_dir_all(dir);
        let www = dir.join("www");
        std::fs::create_dir_all(&www).with_context(|| format!("creating {}", www.display()))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        // Workers run as `nobody`: the files must be readable by anyone.
        for d in [dir, www.as_path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        for &size in sizes {
            // Printable, not all zeros: nothing on the path can compress it.
            let body: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
            let f = www.join(format!("{size}.bin"));
            std::fs::write(&f, body)?;
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644))?;
        }
        let d = dir.display();
        let conf = format!(
            "# Written by the netpol benchmarks.
worker_processes {workers};
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen {port} backlog=4096;
        root {d}/www;
    }}
}}
"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.join("stderr.log"))?;
        let child = netns_command(netns, &bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut n = Nginx {
            child: Some(child),
            dir: dir.to_path_buf(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = run_in_netns(netns, || {
                Ok(TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    Duration::from_millis(200),
                )
                .is_ok())
            })
            .unwrap_or(false);
            if up {
                return Ok(n);
            }
            if let Some(c) = n.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!("nginx exited ({st}) in {}: {}", netns.display(), n.errors());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx in {} does not accept connections on port {port} after 10 s: {}",
                    netns.display(),
                    n.errors()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn errors(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default());
        s.trim().to_string()
    }

    /// Stops nginx (fast shutdown), SIGKILL after 3 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}
