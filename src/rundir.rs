//! The supervisor's private runtime directory (mode 0700), home of the
//! per-generation notify sockets. Created at start, removed at exit.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The longest file name created inside: the notify socket of the last
/// possible generation (`notify.{n}` in the supervisor).
pub const LONGEST_NAME: &str = "notify.18446744073709551615";

/// sun_path is 108 bytes; sd_notify clients expect a terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// `containerflip.<pid>` under `$RUNTIME_DIRECTORY`, `$XDG_RUNTIME_DIR`,
    /// `/run` (root) or `/tmp`. `mkdir` with 0700 is atomic and fails on an
    /// existing name, so the directory is ours alone; a stale one (a PID 1
    /// of an earlier container with a persistent /run) gets a suffix.
    pub fn create() -> Result<RunDir> {
        let base = base_dir();
        let pid = std::process::id();
        // The longest name inside must still fit in sockaddr_un, or deploys
        // would start failing at generation 10, 100, 1000...: refuse now.
        let longest = base
            .join(format!("containerflip.{}.99", u32::MAX))
            .join(LONGEST_NAME);
        let len = longest.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(Error::msg(
                format!("use {} as the runtime directory", base.display()),
                format!(
                    "notify socket paths in it would be up to {len} bytes long, over the \
                     {MAX_SOCKET_PATH} of an AF_UNIX address; point RUNTIME_DIRECTORY or \
                     XDG_RUNTIME_DIR at a shorter directory"
                ),
            ));
        }
        let mut last = None;
        for attempt in 0..100 {
            let name = match attempt {
                0 => format!("containerflip.{pid}"),
                n => format!("containerflip.{pid}.{n}"),
            };
            let path = base.join(name);
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(Error::os(
                        format!("create runtime directory {}", path.display()),
                        e,
                    ));
                }
            }
        }
        Err(Error::os(
            format!("create a runtime directory in {}", base.display()),
            last.unwrap_or_else(|| std::io::Error::other("too many stale directories")),
        ))
    }

    /// The path for a new socket `name`, ready to bind. Workers inherit
    /// `RUNTIME_DIRECTORY` and run as our user, so one may have removed
    /// the directory, or left something at a name not yet used: the
    /// directory is made again (0700) and what sits at the name removed,
    /// rather than every later deploy failing.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        if !self.path.is_dir() {
            match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.path)
            {
                Ok(()) => crate::warn!(
                    "runtime directory {} was removed (by a worker?); created it again",
                    self.path.display()
                ),
                // Binding then fails, naming the path and the error.
                Err(e) => crate::warn!(
                    "runtime directory {} was removed and cannot be created again: {}",
                    self.path.display(),
                    crate::error::os_message(&e)
                ),
            }
        }
        let path = self.path.join(name);
        if std::fs::symlink_metadata(&path).is_ok() {
            match std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir(&path)) {
                Ok(()) => crate::warn!(
                    "removed {} before binding it: left there by a worker?",
                    path.display()
                ),
                // Binding then fails, naming the path and the error.
                Err(e) => crate::warn!(
                    "unable to remove {} (left there by a worker?): {}",
                    path.display(),
                    crate::error::os_message(&e)
                ),
            }
        }
        path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn base_dir() -> PathBuf {
    if let Some(p) = runtime_dir_from_env(|p| p.is_dir()) {
        return p;
    }
    if rustix::process::getuid().is_root() && Path::new("/run").is_dir() {
        return PathBuf::from("/run");
    }
    std::env::temp_dir()
}

/// The first of `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`) and
/// `$XDG_RUNTIME_DIR` that is set to an absolute path (of a colon-separated
/// list, the first entry) and passes `usable`. The runtime directory skips
/// one that is not an existing directory (it has fallbacks); the default
/// control socket does not, so that `run` and a client given the same
/// variables always agree, and a missing directory fails `run` loudly.
pub fn runtime_dir_from_env(usable: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"]
        .iter()
        .find_map(|k| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .and_then(|v| std::env::split_paths(&v).next())
                .filter(|p| p.is_absolute() && usable(p))
        })
}
