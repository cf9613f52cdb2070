//! A private, throwaway PostgreSQL server started from the locally installed server binaries.
//!
//! [`PrivateCluster`] runs `initdb` into a fresh temporary directory, starts the server with
//! `pg_ctl -w` on a free TCP port of 127.0.0.1 (its unix socket lives in the data directory, so it
//! never collides with a system server), and stops it and removes the directory when dropped.
//! `cargo xtask test` uses it when no `DATABASE_URL` is given; `faultline dev` reuses it.
//!
//! Plain `std::process`: no async runtime is needed. When the current user is root, `initdb` and
//! `pg_ctl` refuse to run, so both are run as the `postgres` OS user (via `runuser`, else `su`) and
//! the directory is handed to that user.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Prefix of the temporary directories of private clusters (followed by the owner's pid).
const DIR_PREFIX: &str = "faultline-pg-";

/// The OS user that runs the server when the current user is root.
const SERVICE_USER: &str = "postgres";

/// Why a private cluster could not be found, started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `initdb` / `pg_ctl` were not found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; searched: {searched}. \
         Install the PostgreSQL server (e.g. `apt-get install postgresql`), or put its bin \
         directory first on PATH so that `pg_config --bindir` names it"
    )]
    BinariesNotFound {
        /// The places that were searched.
        searched: String,
    },
    /// Running as root, but there is no `postgres` OS user to run the server as.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but there is no `{user}` OS \
         user to run it as (create one, e.g. `useradd --system {user}`)"
    )]
    NoServiceUser {
        /// The missing user.
        user: String,
    },
    /// A filesystem or process-spawning operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL command ran but failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its output, followed by the tail of the server log when there is one.
        output: String,
    },
}

impl ClusterError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// How to set up a [`PrivateCluster`]. `Default` is right for tests.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterOptions {
    /// Directory holding `initdb` and `pg_ctl`; `None` finds it with [`find_bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// TCP port on 127.0.0.1; `None` picks a free one (and retries with another if it is taken
    /// before the server binds it).
    pub port: Option<u16>,
    /// Trade durability for speed: `fsync`, `synchronous_commit` and `full_page_writes` off, and
    /// `initdb --no-sync`. Right for throwaway test servers (the default), wrong for data you keep.
    pub unsafe_speedups: bool,
    /// Extra server settings, written to `postgresql.conf` as `name = 'value'`.
    pub settings: Vec<(String, String)>,
    /// Where the cluster's temporary directory is created; `None` is `std::env::temp_dir()`.
    /// Must be reachable by the `postgres` OS user when running as root.
    pub parent_dir: Option<PathBuf>,
    /// How long `pg_ctl` may wait for the server to start or stop.
    pub timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            bin_dir: None,
            port: None,
            unsafe_speedups: true,
            settings: vec![("max_connections".into(), "200".into())],
            parent_dir: None,
            timeout: Duration::from_secs(60),
        }
    }
}

impl ClusterOptions {
    /// Uses the binaries in `dir` instead of searching for them.
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Listens on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Turns the durability-for-speed trade on or off (see the field).
    pub fn unsafe_speedups(mut self, on: bool) -> Self {
        self.unsafe_speedups = on;
        self
    }

    /// Adds a server setting.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Creates the cluster's directory under `dir`.
    pub fn parent_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.parent_dir = Some(dir.into());
        self
    }

    /// Sets how long starting or stopping may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A PostgreSQL server of its own: trust authentication, superuser `postgres`, UTF8, listening on
/// 127.0.0.1 only. Stopped, and its directory removed, on drop.
#[derive(Debug)]
pub struct PrivateCluster {
    bin_dir: PathBuf,
    root: PathBuf,
    data_dir: PathBuf,
    port: u16,
    run_as: Option<String>,
    timeout: Duration,
    running: bool,
}

impl PrivateCluster {
    /// Creates and starts a cluster with [`ClusterOptions::default`].
    pub fn start() -> Result<Self, ClusterError> {
        Self::start_with(ClusterOptions::default())
    }

    /// Creates and starts a cluster: `initdb` into a new temporary directory, then `pg_ctl -w
    /// start`. On failure nothing is left behind.
    pub fn start_with(options: ClusterOptions) -> Result<Self, ClusterError> {
        let bin_dir = match &options.bin_dir {
            Some(dir) => {
                check_bin_dir(dir).ok_or_else(|| ClusterError::BinariesNotFound {
                    searched: dir.display().to_string(),
                })?;
                dir.clone()
            }
            None => find_bin_dir()?,
        };
        let run_as = if running_as_root() {
            Some(SERVICE_USER.to_owned())
        } else {
            None
        };
        let owner = match &run_as {
            Some(user) => Some(lookup_user(user)?),
            None => None,
        };

        let parent = options
            .parent_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let root = create_unique_dir(&parent)?;
        // From here on, dropping `cluster` removes the directory (and stops a started server).
        let mut cluster = Self {
            bin_dir,
            data_dir: root.join("data"),
            root,
            port: 0,
            run_as,
            timeout: options.timeout,
            running: false,
        };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&cluster.root, Some(uid), Some(gid))
                .map_err(|e| ClusterError::io(format!("chown {}", cluster.root.display()), e))?;
        }
        cluster.init(&options)?;

        let attempts = if options.port.is_some() { 1 } else { 5 };
        for attempt in 1..=attempts {
            cluster.port = match options.port {
                Some(port) => port,
                None => free_port()?,
            };
            match cluster.pg_ctl_start() {
                Ok(()) => {
                    cluster.running = true;
                    return Ok(cluster);
                }
                // Someone else took the port between our probe and the server's bind: try another.
                Err(ClusterError::CommandFailed { ref output, .. })
                    if attempt < attempts && output.contains("could not bind") => {}
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (which also holds the server's unix socket).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log file.
    pub fn log_file(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Whether the server was started and not yet stopped.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stops the server (`pg_ctl stop -m fast`), keeping its directory until drop. Stopping a
    /// stopped cluster does nothing.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        let timeout = self.timeout.as_secs().max(1).to_string();
        let args: Vec<OsString> = vec![
            "stop".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-m".into(),
            "fast".into(),
            "-w".into(),
            "-t".into(),
            timeout.into(),
        ];
        self.run_tool("pg_ctl", &args)?;
        self.running = false;
        Ok(())
    }

    fn init(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let mut args: Vec<OsString> = vec!["-D".into(), self.data_dir.clone().into()];
        for arg in ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"] {
            args.push(arg.into());
        }
        if options.unsafe_speedups {
            args.push("--no-sync".into());
        }
        self.run_tool("initdb", &args)?;

        // Settings go to postgresql.conf rather than `pg_ctl -o`, which passes them through a shell.
        let mut conf = String::from("\n# faultline private cluster\n");
        let socket_dir = self.data_dir.display().to_string();
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("unix_socket_directories".into(), socket_dir),
            ("logging_collector".into(), "off".into()),
        ];
        if options.unsafe_speedups {
            for name in ["fsync", "synchronous_commit", "full_page_writes"] {
                settings.push((name.into(), "off".into()));
            }
        }
        settings.extend(options.settings.iter().cloned());
        for (name, value) in &settings {
            let _ = writeln!(conf, "{name} = '{}'", value.replace('\'', "''"));
        }
        let path = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| ClusterError::io(format!("open {}", path.display()), e))?;
        std::io::Write::write_all(&mut file, conf.as_bytes())
            .map_err(|e| ClusterError::io(format!("write {}", path.display()), e))
    }

    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let timeout = self.timeout.as_secs().max(1).to_string();
        let args: Vec<OsString> = vec![
            "start".into(),
            "-D".into(),
            self.data_dir.clone().into(),
            "-l".into(),
            self.log_file().into(),
            "-o".into(),
            format!("-p {}", self.port).into(),
            "-w".into(),
            "-t".into(),
            timeout.into(),
        ];
        self.run_tool("pg_ctl", &args).map_err(|e| match e {
            ClusterError::CommandFailed {
                command,
                status,
                mut output,
            } => {
                let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                output.push_str("\nserver log (tail):\n");
                for line in tail.into_iter().rev() {
                    output.push_str(line);
                    output.push('\n');
                }
                ClusterError::CommandFailed {
                    command,
                    status,
                    output,
                }
            }
            other => other,
        })
    }

    /// Runs `bin_dir/tool args`, as the service user when running as root.
    fn run_tool(&self, tool: &str, args: &[OsString]) -> Result<(), ClusterError> {
        let program = self.bin_dir.join(tool);
        let mut command = match &self.run_as {
            None => {
                let mut command = Command::new(&program);
                command.args(args);
                command
            }
            Some(user) if Path::new("/usr/sbin/runuser").exists() || on_path("runuser") => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(&program).args(args);
                command
            }
            Some(user) => {
                let mut line = shell_quote(&program.to_string_lossy());
                for arg in args {
                    line.push(' ');
                    line.push_str(&shell_quote(&arg.to_string_lossy()));
                }
                let mut command = Command::new("su");
                command.args([user, "-s", "/bin/sh", "-c", &line]);
                command
            }
        };
        // The server inherits neither our stdin nor a locale that initdb might dislike.
        command
            .stdin(Stdio::null())
            .current_dir(&self.root)
            .env("LC_ALL", "C");
        let described = describe(&program, args);
        let output = command
            .output()
            .map_err(|e| ClusterError::io(format!("run `{described}`"), e))?;
        if output.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Err(ClusterError::CommandFailed {
            command: described,
            status: output.status,
            output: text,
        })
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        // A server may also run after a failed start (e.g. `pg_ctl -w` timed out): the pid file says.
        let maybe_running = self.running || self.data_dir.join("postmaster.pid").exists();
        self.running = maybe_running;
        if maybe_running && self.stop().is_err() {
            // Last resort: an immediate shutdown, so no server outlives its directory.
            let args: Vec<OsString> = vec![
                "stop".into(),
                "-m".into(),
                "immediate".into(),
                "-D".into(),
                self.data_dir.clone().into(),
            ];
            let _ = self.run_tool("pg_ctl", &args);
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Finds the directory holding `initdb` and `pg_ctl`: `pg_config --bindir` first, else the newest
/// `/usr/lib/postgresql/*/bin`, else a `PATH` directory that has both.
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    let mut searched = Vec::new();
    searched.push("`pg_config --bindir`".to_owned());
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if let Some(dir) = check_bin_dir(&dir) {
            return Ok(dir);
        }
        searched[0] = format!("`pg_config --bindir` ({})", dir.display());
    }

    searched.push("/usr/lib/postgresql/*/bin".to_owned());
    let mut versions: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = name
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u64>, _>>()
                .ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    for (_, dir) in versions.into_iter().rev() {
        if let Some(dir) = check_bin_dir(&dir) {
            return Ok(dir);
        }
    }

    searched.push("PATH".to_owned());
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if let Some(dir) = check_bin_dir(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(ClusterError::BinariesNotFound {
        searched: searched.join(", "),
    })
}

/// Stops the servers and removes the directories of private clusters whose owning process is
/// gone (killed before it could drop its cluster). Returns how many were cleaned. Best effort.
pub fn reap_orphans() -> usize {
    let Ok(bin_dir) = find_bin_dir() else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return 0;
    };
    let mut reaped = 0;
    if !Path::new("/proc/self").exists() {
        return 0; // cannot tell live owners from dead ones
    }
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let root = entry.path();
        let orphan = PrivateCluster {
            bin_dir: bin_dir.clone(),
            data_dir: root.join("data"),
            root,
            port: 0,
            run_as: running_as_root().then(|| SERVICE_USER.to_owned()),
            timeout: Duration::from_secs(30),
            running: false,
        };
        // Drop stops its server if one runs there (per the pid file) and removes the directory.
        drop(orphan);
        reaped += 1;
    }
    reaped
}

fn check_bin_dir(dir: &Path) -> Option<PathBuf> {
    (dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()).then(|| dir.to_path_buf())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective user of this process.
    match std::fs::metadata("/proc/self") {
        Ok(meta) => meta.uid() == 0,
        Err(_) => Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0"),
    }
}

/// The uid and gid of an OS user, from `getent passwd`.
fn lookup_user(user: &str) -> Result<(u32, u32), ClusterError> {
    let missing = || ClusterError::NoServiceUser {
        user: user.to_owned(),
    };
    let output = Command::new("getent")
        .args(["passwd", user])
        .output()
        .map_err(|e| ClusterError::io("run `getent passwd`", e))?;
    if !output.status.success() {
        return Err(missing());
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<&str> = line.trim().split(':').collect();
    match (
        fields.get(2).and_then(|f| f.parse().ok()),
        fields.get(3).and_then(|f| f.parse().ok()),
    ) {
        (Some(uid), Some(gid)) => Ok((uid, gid)),
        _ => Err(missing()),
    }
}

fn create_unique_dir(parent: &Path) -> Result<PathBuf, ClusterError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("{DIR_PREFIX}{}-{n}-{nanos}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(ClusterError::io(format!("create {}", dir.display()), e)),
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| ClusterError::io("find a free port on 127.0.0.1", e))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| ClusterError::io("find a free port on 127.0.0.1", e))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn describe(program: &Path, args: &[OsString]) -> String {
    let mut line = program.display().to_string();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::{Connection, PgConnection};

    #[tokio::test]
    async fn starts_serves_and_stops() {
        let options = ClusterOptions::default().setting("work_mem", "7MB");
        let mut cluster = PrivateCluster::start_with(options).expect("start a private cluster");
        assert!(cluster.is_running());
        let url = cluster.url();
        assert_eq!(
            url,
            format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
        );

        let mut conn = PgConnection::connect(&url).await.expect("connect");
        let one: i32 = sqlx::query_scalar("select 1")
            .fetch_one(&mut conn)
            .await
            .expect("select 1");
        assert_eq!(one, 1);
        let encoding: String = sqlx::query_scalar("show server_encoding")
            .fetch_one(&mut conn)
            .await
            .expect("show server_encoding");
        assert_eq!(encoding, "UTF8");
        let work_mem: String = sqlx::query_scalar("show work_mem")
            .fetch_one(&mut conn)
            .await
            .expect("show work_mem");
        assert_eq!(work_mem, "7MB", "settings reach postgresql.conf");
        conn.close().await.expect("close");

        cluster.stop().expect("stop");
        assert!(!cluster.is_running());
        let refused = PgConnection::connect(&url).await;
        assert!(refused.is_err(), "a stopped cluster accepted a connection");
        cluster.stop().expect("stopping twice is a no-op");

        let root = cluster.data_dir().parent().expect("root").to_path_buf();
        assert!(root.exists());
        drop(cluster);
        assert!(!root.exists(), "drop left {} behind", root.display());
    }

    #[tokio::test]
    async fn drop_stops_a_running_server() {
        let cluster = PrivateCluster::start().expect("start a private cluster");
        let url = cluster.url();
        PgConnection::connect(&url)
            .await
            .expect("connect")
            .close()
            .await
            .expect("close");
        drop(cluster);
        assert!(PgConnection::connect(&url).await.is_err());
    }

    #[test]
    fn a_taken_port_is_a_clear_error_and_leaves_nothing_behind() {
        let parent = create_unique_dir(&std::env::temp_dir()).expect("temp dir");
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let options = ClusterOptions::default().port(port).parent_dir(&parent);
        let err = PrivateCluster::start_with(options).expect_err("the port is taken");
        let leftovers = std::fs::read_dir(&parent).expect("read dir").count();
        std::fs::remove_dir_all(&parent).expect("remove temp dir");
        assert!(err.to_string().contains("could not bind"), "{err}");
        assert_eq!(leftovers, 0, "a failed start left its directory behind");
    }

    #[test]
    fn orphans_of_dead_processes_are_reaped_and_live_ones_kept() {
        let mut child = Command::new("true").spawn().expect("spawn");
        let dead_pid = child.id();
        child.wait().expect("wait");
        let orphan = std::env::temp_dir().join(format!("{DIR_PREFIX}{dead_pid}-0-0"));
        std::fs::create_dir_all(orphan.join("data")).expect("create orphan");
        let live = PrivateCluster::start().expect("start a private cluster");

        assert!(reap_orphans() >= 1);

        assert!(!orphan.exists(), "the orphan of a dead process was kept");
        assert!(live.data_dir().exists(), "a live cluster was reaped");
        assert!(live.is_running());
    }

    #[test]
    fn missing_binaries_are_a_clear_error() {
        let empty = create_unique_dir(&std::env::temp_dir()).expect("temp dir");
        let options = ClusterOptions::default().bin_dir(&empty);
        let err = PrivateCluster::start_with(options).expect_err("no binaries there");
        std::fs::remove_dir(&empty).expect("remove temp dir");
        assert!(
            matches!(err, ClusterError::BinariesNotFound { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("initdb"), "{err}");
    }

    #[test]
    fn finds_the_installed_binaries() {
        let dir = find_bin_dir().expect("PostgreSQL is installed on this machine");
        assert!(dir.join("initdb").is_file());
        assert!(dir.join("pg_ctl").is_file());
    }
}
