//! Log lines for the operator. stdout belongs to the CNI result, so lines go
//! to the configured `logFile`, or to stderr (which runtimes keep or show
//! with a failed command).

use std::{fmt::Arguments, io::Write as _, path::PathBuf, sync::OnceLock};

struct Target {
    file: Option<PathBuf>,
    /// `ADD container=<id> ifname=<if>`
    context: String,
}

static TARGET: OnceLock<Target> = OnceLock::new();

/// Where lines go and what each line says it is about; the first call wins.
pub fn init(file: Option<PathBuf>, context: String) {
    let _ = TARGET.set(Target { file, context });
}

pub fn info(msg: Arguments<'_>) {
    write("info", msg);
}

pub fn error(msg: Arguments<'_>) {
    write("error", msg);
}

fn write(level: &str, msg: Arguments<'_>) {
    let (file, context) = match TARGET.get() {
        Some(t) => (t.file.as_ref(), t.context.as_str()),
        None => (None, ""),
    };
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
    let line = format!("{now} {level} netpol-cni {context}: {msg}\n");
    if let Some(path) = file {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut f) = opened
            && f.write_all(line.as_bytes()).is_ok()
        {
            return;
        }
    }
    let _ = std::io::stderr().write_all(line.as_bytes());
}
