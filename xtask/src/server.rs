//! Finding a PostgreSQL server for `cargo xtask test`: `DATABASE_URL`, else a private cluster from
//! the local binaries, else a `postgres:15` Docker container; each torn down when dropped.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use faultline_postgres::cluster::{ClusterError, PrivateCluster, reap_orphans};
use sqlx::{Connection, PgConnection};

/// The image used when Docker is the only way to get a server.
const DOCKER_IMAGE: &str = "postgres:15";

/// A server for the duration of a test run.
#[derive(Debug)]
pub(crate) enum Server {
    /// Given by `DATABASE_URL`; left alone.
    External(String),
    /// Ours; stopped and removed on drop.
    Private(PrivateCluster),
    /// Ours; the container is removed on drop.
    Docker(DockerPostgres),
}

impl Server {
    /// Finds or starts a server, saying which on stderr.
    pub(crate) fn resolve() -> anyhow::Result<Self> {
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.trim().is_empty()
        {
            eprintln!("xtask: using DATABASE_URL ({url})");
            return Ok(Self::External(url));
        }

        let reaped = reap_orphans();
        if reaped > 0 {
            eprintln!("xtask: removed {reaped} private cluster(s) left by killed runs");
        }
        let cluster_error = match PrivateCluster::start() {
            Ok(cluster) => {
                eprintln!(
                    "xtask: DATABASE_URL is not set; started a private PostgreSQL cluster at {}",
                    cluster.url()
                );
                return Ok(Self::Private(cluster));
            }
            Err(error) => error,
        };
        if !matches!(cluster_error, ClusterError::BinariesNotFound { .. }) {
            eprintln!("xtask: could not start a private PostgreSQL cluster: {cluster_error}");
        }

        if docker_engine_running() {
            eprintln!("xtask: DATABASE_URL is not set; starting a {DOCKER_IMAGE} container");
            return Ok(Self::Docker(DockerPostgres::start()?));
        }

        bail!(
            "no PostgreSQL server for the tests. Either\n  \
             - set DATABASE_URL=postgres://USER@HOST:PORT/DB (USER must be allowed to create \
             databases), or\n  \
             - install the PostgreSQL server binaries (e.g. `apt-get install postgresql`; initdb \
             and pg_ctl are found through `pg_config --bindir` or /usr/lib/postgresql/*/bin), or\n  \
             - start a Docker engine (a {DOCKER_IMAGE} container is then used).\n\
             Private cluster: {cluster_error}"
        )
    }

    /// The server's URL.
    pub(crate) fn url(&self) -> String {
        match self {
            Self::External(url) => url.clone(),
            Self::Private(cluster) => cluster.url(),
            Self::Docker(docker) => docker.url.clone(),
        }
    }
}

/// A `postgres:15` container started with the docker CLI, removed on drop.
#[derive(Debug)]
pub(crate) struct DockerPostgres {
    id: String,
    url: String,
}

impl DockerPostgres {
    fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let output = Command::new("docker")
            .args(["run", "--detach", "--rm", "--label", "faultline-xtask=test"])
            .args(["--env", "POSTGRES_HOST_AUTH_METHOD=trust"])
            .args(["--publish", &format!("127.0.0.1:{port}:5432")])
            .arg(DOCKER_IMAGE)
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("run `docker run`")?;
        if !output.status.success() {
            bail!("`docker run {DOCKER_IMAGE}` failed ({})", output.status);
        }
        let container = Self {
            id: String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        // The image's entrypoint initialises the cluster with TCP off, then restarts it with TCP
        // on: the first successful TCP connection means the final server is up.
        let deadline = Instant::now() + Duration::from_secs(120);
        let runtime = crate::runtime()?;
        loop {
            let attempt = runtime.block_on(async {
                let conn = PgConnection::connect(&container.url).await?;
                conn.close().await
            });
            match attempt {
                Ok(()) => return Ok(container),
                Err(error) if Instant::now() > deadline => {
                    bail!(
                        "the {DOCKER_IMAGE} container did not accept connections in time: {error}"
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}

impl Drop for DockerPostgres {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "--force", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn docker_engine_running() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}
