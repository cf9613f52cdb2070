//! `TestDb`: a fresh PostgreSQL database for each test, cloned from a migrated template.
//!
//! The server comes from `DATABASE_URL` (`cargo xtask test` provides one). On first use per server
//! and per migrations checksum, a template database `faultline_tpl_<checksum>` is created and
//! migrated under a PostgreSQL advisory lock, so that the many processes nextest starts (one per
//! test) can race for it safely; every test then gets its own `CREATE DATABASE ... TEMPLATE`
//! clone, which takes milliseconds. Databases are dropped when their `TestDb` is; with
//! `FAULTLINE_KEEP_FAILED_DB=1` a failed (panicking) test's database is kept for inspection
//! instead (not by default: a shrinking property test would keep one per attempt).
//! `cargo xtask test` sweeps leftovers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

/// Prefix of every test database's name: `faultline_t_<unix secs>_<pid>_<counter>`.
pub const DATABASE_PREFIX: &str = "faultline_t_";

/// Prefix of the template databases' names: `faultline_tpl_<migrations checksum>`.
pub const TEMPLATE_PREFIX: &str = "faultline_tpl_";

/// The advisory lock (on the server's `DATABASE_URL` database) held while a template is built or
/// templates are dropped.
pub const TEMPLATE_LOCK_KEY: i64 = 0x6661_756c_746c_6e01;

/// Set this variable to keep the database of a failed (panicking) test for inspection.
pub const KEEP_FAILED_ENV: &str = "FAULTLINE_KEEP_FAILED_DB";

/// Connections per test database pool.
const POOL_SIZE: u32 = 20;

/// A database of its own for one test. See the module docs.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    server: PgConnectOptions,
    pool: PgPool,
}

impl TestDb {
    /// A new database with every migration applied (cloned from the template).
    ///
    /// # Panics
    /// When `DATABASE_URL` is unset or the server cannot be used: there is no test without it.
    pub async fn fresh() -> TestDb {
        Self::create(true).await
    }

    /// A new, empty database (no migrations applied), for testing migrations themselves.
    ///
    /// # Panics
    /// As [`TestDb::fresh`].
    pub async fn fresh_unmigrated() -> TestDb {
        Self::create(false).await
    }

    /// A pool of up to 20 connections to this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// This database's URL (`DATABASE_URL` with the database name replaced).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// This database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connection options for this database, e.g. for a second, differently sized pool.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.server.clone().database(&self.name)
    }

    async fn create(migrated: bool) -> TestDb {
        let server_url = server_url();
        let server: PgConnectOptions = server_url
            .parse()
            .unwrap_or_else(|e| panic!("DATABASE_URL ({server_url}) is not a PostgreSQL URL: {e}"));
        let mut admin = PgConnection::connect_with(&server)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL ({server_url}): {e}"));
        let name = unique_name();
        if migrated {
            let template = template_name();
            let mut attempts = 0;
            loop {
                attempts += 1;
                ensure_template(&mut admin, &server, &template).await;
                let create = format!("create database \"{name}\" template \"{template}\"");
                match sqlx::query(AssertSqlSafe(create)).execute(&mut admin).await {
                    Ok(_) => break,
                    // `cargo xtask test` dropped the template between our check and our clone.
                    Err(e) if sqlstate(&e) == Some("3D000") && attempts < 3 => continue,
                    Err(e) => panic!("cannot create test database {name} from {template}: {e}"),
                }
            }
        } else {
            let create = format!("create database \"{name}\"");
            sqlx::query(AssertSqlSafe(create))
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        }
        let _ = admin.close().await;

        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .connect_with(server.clone().database(&name))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to test database {name}: {e}"));
        TestDb {
            url: with_database(&server_url, &name),
            name,
            server,
            pool,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os(KEEP_FAILED_ENV).is_some() {
            eprintln!(
                "test database {} of a failed test kept ({}); `cargo xtask test` drops it later",
                self.name, self.url
            );
            return;
        }
        // Drop runs inside the test's runtime, which must not be blocked on: use a thread (and a
        // runtime) of its own. Best effort: leftovers are swept by `cargo xtask test`.
        let server = self.server.clone();
        let drop_sql = format!("drop database if exists \"{}\" with (force)", self.name);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect_with(&server).await.ok()?;
                let dropped = sqlx::query(AssertSqlSafe(drop_sql))
                    .execute(&mut admin)
                    .await;
                let _ = admin.close().await;
                dropped.ok()
            })
        })
        .join();
    }
}

/// `DATABASE_URL`, or a panic that says how to provide it.
fn server_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set. Run the tests with `cargo xtask test`, which provides a \
             PostgreSQL server (DATABASE_URL, a private cluster from the local PostgreSQL \
             binaries, or Docker), or set DATABASE_URL=postgres://USER@HOST:PORT/DB to a server \
             where USER may create databases"
        ),
    }
}

/// Makes sure the migrated template database exists, building it if needed. Concurrent callers
/// (in any process) serialise on [`TEMPLATE_LOCK_KEY`]; the template appears under its final name
/// only once fully migrated.
async fn ensure_template(admin: &mut PgConnection, server: &PgConnectOptions, template: &str) {
    if database_exists(admin, template).await {
        return;
    }
    sqlx::query("select pg_advisory_lock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut *admin)
        .await
        .unwrap_or_else(|e| panic!("cannot take the template lock: {e}"));
    // Another process may have built it while we waited.
    if !database_exists(admin, template).await {
        build_template(admin, server, template).await;
    }
    sqlx::query("select pg_advisory_unlock($1)")
        .bind(TEMPLATE_LOCK_KEY)
        .execute(&mut *admin)
        .await
        .unwrap_or_else(|e| panic!("cannot release the template lock: {e}"));
}

/// Builds the template under a temporary name (left over only by a builder that died, which the
/// lock tells us is not running now), migrates it, then renames it into place.
async fn build_template(admin: &mut PgConnection, server: &PgConnectOptions, template: &str) {
    let building = format!("{template}_build");
    let statements = [
        format!("drop database if exists \"{building}\" with (force)"),
        format!("create database \"{building}\""),
    ];
    for sql in statements {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .execute(&mut *admin)
            .await
            .unwrap_or_else(|e| panic!("building the test template failed at `{sql}`: {e}"));
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.clone().database(&building))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {building}: {e}"));
    faultline_postgres::migrate(&pool)
        .await
        .unwrap_or_else(|e| panic!("migrating the test template failed: {e}"));
    pool.close().await;
    // No connections from now on, so cloning never finds "other users" on the template.
    let statements = [
        format!("alter database \"{building}\" with is_template true allow_connections false"),
        format!("alter database \"{building}\" rename to \"{template}\""),
    ];
    for sql in statements {
        sqlx::query(AssertSqlSafe(sql.clone()))
            .execute(&mut *admin)
            .await
            .unwrap_or_else(|e| panic!("building the test template failed at `{sql}`: {e}"));
    }
}

async fn database_exists(admin: &mut PgConnection, name: &str) -> bool {
    sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(name)
        .fetch_one(admin)
        .await
        .unwrap_or_else(|e| panic!("cannot list databases: {e}"))
}

/// The template's name: [`TEMPLATE_PREFIX`] and a checksum of every migration (version and the
/// checksum sqlx keeps of its SQL), so a changed migration gets a template of its own.
pub fn template_name() -> String {
    // FNV-1a: stable across processes, builds and toolchains.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for migration in faultline_postgres::MIGRATOR.iter() {
        feed(&migration.version.to_le_bytes());
        feed(&migration.checksum);
    }
    format!("{TEMPLATE_PREFIX}{hash:016x}")
}

/// `faultline_t_<unix secs>_<pid>_<counter>`: unique across concurrent test processes, and its
/// age can be read off by `cargo xtask test` when it sweeps leftovers.
fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{DATABASE_PREFIX}{secs}_{}_{n}", std::process::id())
}

/// `url` with its database (the path) replaced by `database`, query parameters kept.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

fn sqlstate(error: &sqlx::Error) -> Option<&str> {
    match error {
        sqlx::Error::Database(e) => match e.code() {
            Some(std::borrow::Cow::Borrowed(code)) => Some(code),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn server() -> PgConnection {
        PgConnection::connect(&server_url()).await.expect("connect")
    }

    async fn exists(name: &str) -> bool {
        database_exists(&mut server().await, name).await
    }

    async fn has_jobs_table(pool: &PgPool) -> bool {
        sqlx::query_scalar("select to_regclass('faultline_jobs') is not null")
            .fetch_one(pool)
            .await
            .expect("query")
    }

    #[tokio::test]
    async fn fresh_databases_are_migrated_separate_and_dropped() {
        let a = TestDb::fresh().await;
        let b = TestDb::fresh().await;
        assert_ne!(a.name(), b.name());
        assert!(a.name().starts_with(DATABASE_PREFIX));
        for db in [&a, &b] {
            let current: String = sqlx::query_scalar("select current_database()")
                .fetch_one(db.pool())
                .await
                .expect("current_database");
            assert_eq!(current, db.name());
            assert!(
                has_jobs_table(db.pool()).await,
                "{} is not migrated",
                db.name()
            );
        }

        sqlx::query("create table only_in_a (x int)")
            .execute(a.pool())
            .await
            .expect("create table");
        let in_b: bool = sqlx::query_scalar("select to_regclass('only_in_a') is not null")
            .fetch_one(b.pool())
            .await
            .expect("query");
        assert!(
            !in_b,
            "a table created in one test database showed up in another"
        );

        let (name_a, name_b) = (a.name().to_owned(), b.name().to_owned());
        assert!(exists(&name_a).await && exists(&name_b).await);
        drop(a);
        assert!(!exists(&name_a).await, "{name_a} survived its TestDb");
        assert!(exists(&name_b).await);
    }

    #[test]
    fn a_failed_tests_database_is_dropped_too_by_default() {
        if std::env::var_os(KEEP_FAILED_ENV).is_some() {
            return; // asked to keep it
        }
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let failed_test = std::thread::spawn(move || {
            runtime().block_on(async {
                let db = TestDb::fresh().await;
                tx.send(db.name().to_owned()).expect("send");
                panic!("a deliberately failing test");
            })
        });
        assert!(failed_test.join().is_err());
        let name = rx.recv().expect("the test made a database");
        assert!(!runtime().block_on(exists(&name)), "{name} was kept");
    }

    #[tokio::test]
    async fn url_and_connect_options_reach_the_same_database() {
        let db = TestDb::fresh().await;
        assert!(db.url().contains(db.name()), "{}", db.url());
        let mut by_url = PgConnection::connect(db.url())
            .await
            .expect("connect by url");
        let current: String = sqlx::query_scalar("select current_database()")
            .fetch_one(&mut by_url)
            .await
            .expect("query");
        assert_eq!(current, db.name());
        by_url.close().await.expect("close");
        let mut by_options = PgConnection::connect_with(&db.connect_options())
            .await
            .expect("connect by options");
        let current: String = sqlx::query_scalar("select current_database()")
            .fetch_one(&mut by_options)
            .await
            .expect("query");
        assert_eq!(current, db.name());
        by_options.close().await.expect("close");
    }

    #[tokio::test]
    async fn unmigrated_databases_are_empty_and_migratable() {
        let db = TestDb::fresh_unmigrated().await;
        assert!(!has_jobs_table(db.pool()).await);
        faultline_postgres::migrate(db.pool())
            .await
            .expect("migrate");
        assert!(has_jobs_table(db.pool()).await);
    }

    #[tokio::test]
    async fn the_template_is_built_once_and_cannot_be_connected_to() {
        let _db = TestDb::fresh().await;
        let template = template_name();
        let (is_template, allow_connections): (bool, bool) = sqlx::query_as(
            "select datistemplate, datallowconn from pg_database where datname = $1",
        )
        .bind(&template)
        .fetch_one(&mut server().await)
        .await
        .expect("the template exists");
        assert!(is_template && !allow_connections);
        assert!(!exists(&format!("{template}_build")).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fresh_calls_all_succeed() {
        let handles: Vec<_> = (0..6).map(|_| tokio::spawn(TestDb::fresh())).collect();
        let mut dbs = Vec::new();
        for handle in handles {
            dbs.push(handle.await.expect("task"));
        }
        let mut names: Vec<&str> = dbs.iter().map(TestDb::name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 6);
    }

    #[test]
    fn template_name_is_stable_and_well_formed() {
        let name = template_name();
        assert_eq!(name, template_name());
        assert!(name.starts_with(TEMPLATE_PREFIX));
        assert_eq!(name.len(), TEMPLATE_PREFIX.len() + 16);
        assert!(name.len() + "_build".len() <= 63, "identifier too long");
    }

    #[test]
    fn unique_names_are_unique_and_short() {
        let (a, b) = (unique_name(), unique_name());
        assert_ne!(a, b);
        assert!(a.starts_with(DATABASE_PREFIX) && a.len() <= 63, "{a}");
    }

    #[test]
    fn with_database_replaces_only_the_path() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/x",
            ),
            (
                "postgres://u:p@h/db?sslmode=disable",
                "postgres://u:p@h/x?sslmode=disable",
            ),
            ("postgres://u@h:1", "postgres://u@h:1/x"),
            (
                "postgresql:///db?host=/run/pg",
                "postgresql:///x?host=/run/pg",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_database(url, "x"), expected, "{url}");
        }
    }
}
