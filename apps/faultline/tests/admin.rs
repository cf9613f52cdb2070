//! The operator commands as real processes against real PostgreSQL: `queue pause`, `queue list`
//! and `queue resume` change and show what the database holds (no claim returns a paused queue's
//! jobs; a running worker runs them once the queue is resumed), bad names, unmigrated databases
//! and a missing database URL are refused, and `worker list` shows the registered processes with
//! the leader marked.

use std::process::Stdio;
use std::time::Duration;

use faultline_ports::domain::{Job, JobSpec, JobState};
use faultline_ports::{ClaimParams, ElectParams, JobStore, ProcessSpec, QueueSlots};
use faultline_postgres::PgStore;
use faultline_tests::TestDb;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Longest wait for anything that must happen.
const DEADLINE: Duration = Duration::from_secs(60);

/// Pause between two looks at the database while polling for a state.
const POLL: Duration = Duration::from_millis(25);

/// `faultline args` with only `env` from the Faultline settings (the test's own `DATABASE_URL`
/// and `FAULTLINE_*` variables are removed).
fn faultline(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_faultline"));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env_remove("DATABASE_URL");
    for (name, _) in std::env::vars() {
        if name.starts_with("FAULTLINE_") {
            command.env_remove(name);
        }
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// What a finished command printed.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `faultline args` to its end.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let output = tokio::time::timeout(DEADLINE, faultline(args, env).output())
        .await
        .unwrap_or_else(|_| panic!("faultline {args:?} still runs at the deadline"))
        .expect("run faultline");
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs `faultline args` on `db` and expects success; returns its standard output.
async fn ok(db: &TestDb, args: &[&str]) -> String {
    let output = run(args, &[("DATABASE_URL", db.url())]).await;
    assert_eq!(output.code, Some(0), "faultline {args:?}: {output:?}");
    output.stdout
}

/// A claim of up to 10 jobs of the queue `mail`.
fn mail_claim() -> ClaimParams {
    ClaimParams {
        queues: vec!["mail".into()],
        kinds: Vec::new(),
        limit: 10,
        lease_ms: 30_000,
        worker_id: "admin-test".into(),
        claim_id: None,
    }
}

/// The `queue list` line of `queue`, split into its columns.
fn queue_line(table: &str, queue: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|line| line.split_whitespace().next() == Some(queue))
        .unwrap_or_else(|| panic!("no {queue} in\n{table}"));
    // "yes, since <time>" is one column.
    line.replace(", since ", ",since,")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Polls the job until `done` holds; returns it.
async fn wait_for(store: &PgStore, id: i64, done: impl Fn(&Job) -> bool) -> Job {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let job = store.job_get(id).await.expect("job_get");
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "at the deadline: {job:?}");
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test]
async fn queue_limit_sets_and_removes_the_bound_the_claims_obey() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    for _ in 0..5 {
        store
            .job_enqueue(&JobSpec::new("noop", json!({})).queue("mail"))
            .await
            .expect("enqueue");
    }
    let set = ok(&db, &["queue", "limit", "mail", "--max-running", "2"]).await;
    assert_eq!(set.trim_end(), "queue mail: at most 2 running at once");
    let rows = store.queue_list().await.expect("rows");
    assert_eq!(rows[0].max_running, Some(2), "{rows:?}");
    let claim = mail_claim();
    assert_eq!(store.job_claim(&claim).await.expect("claim").len(), 2);
    let table = ok(&db, &["queue", "list"]).await;
    assert_eq!(queue_line(&table, "mail")[7], "2", "{table}");

    let removed = ok(&db, &["queue", "limit", "mail", "--max-running", "none"]).await;
    assert_eq!(removed.trim_end(), "queue mail: no bound on running jobs");
    assert_eq!(store.job_claim(&claim).await.expect("claim").len(), 3);
    assert_eq!(
        queue_line(&ok(&db, &["queue", "list"]).await, "mail")[7],
        "-"
    );

    for bad in ["0", "-3", "1000001", "many", ""] {
        let output = run(
            &["queue", "limit", "mail", "--max-running", bad],
            &[("DATABASE_URL", db.url())],
        )
        .await;
        assert_eq!(output.code, Some(2), "{bad:?}: {output:?}");
        assert!(
            output.stderr.contains("from 1 to 1000000 or `none`"),
            "{bad:?}: {output:?}"
        );
    }
    let missing = run(&["queue", "limit", "mail"], &[("DATABASE_URL", db.url())]).await;
    assert_eq!(missing.code, Some(2), "{missing:?}");
    assert!(missing.stderr.contains("--max-running"), "{missing:?}");
    assert_eq!(
        store.queue_list().await.expect("rows")[0].max_running,
        None,
        "refused commands changed nothing"
    );
}

#[tokio::test]
async fn queue_pause_list_and_resume_change_what_the_database_holds() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    assert!(ok(&db, &["queue", "list"]).await.starts_with("no queues"));

    let paused = ok(&db, &["queue", "pause", "mail"]).await;
    assert!(
        paused.starts_with("queue mail is paused (since "),
        "{paused}"
    );
    let rows = store.queue_list().await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].paused && rows[0].name == "mail", "{rows:?}");
    let again = ok(&db, &["queue", "pause", "mail"]).await;
    assert_eq!(again, paused, "pausing twice changes nothing");

    for _ in 0..2 {
        store
            .job_enqueue(&JobSpec::new("noop", json!({})).queue("mail"))
            .await
            .expect("enqueue into a paused queue");
    }
    store
        .job_enqueue(&JobSpec::new("noop", json!({})).queue("bulk"))
        .await
        .expect("enqueue");
    let table = ok(&db, &["queue", "list"]).await;
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "QUEUE",
            "PAUSED",
            "QUEUED",
            "RUNNING",
            "SUCCEEDED",
            "FAILED",
            "CANCELLED",
            "MAX",
            "RUNNING",
            "OLDEST",
            "READY"
        ]
    );
    let names: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(names, ["bulk", "mail"], "{table}");
    let mail = queue_line(&table, "mail");
    let since = rows[0]
        .paused_at
        .expect("paused_at")
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        mail[1..4],
        ["yes,since,".to_owned() + &since, "2".into(), "0".into()],
        "{table}"
    );
    assert_eq!(queue_line(&table, "bulk")[1..3], ["no", "1"], "{table}");

    // Nothing of the paused queue is claimed; after the resume, its jobs are.
    let claim = mail_claim();
    assert_eq!(store.job_claim(&claim).await.expect("claim"), []);

    let resumed = ok(&db, &["queue", "resume", "mail"]).await;
    assert_eq!(resumed.trim_end(), "queue mail is active (not paused)");
    assert!(!store.queue_list().await.expect("rows")[1].paused);
    assert_eq!(store.job_claim(&claim).await.expect("claim").len(), 2);
    let table = ok(&db, &["queue", "list"]).await;
    assert_eq!(
        queue_line(&table, "mail")[1..4],
        ["no", "0", "2"],
        "{table}"
    );
}

#[tokio::test]
async fn a_worker_claims_nothing_of_a_queue_paused_from_the_command_line() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    ok(&db, &["queue", "pause", "mail"]).await;
    let mut worker = faultline(
        &["worker", "--demo-handlers", "--queues", "mail,bulk"],
        &[
            ("DATABASE_URL", db.url()),
            ("FAULTLINE_METRICS_LISTEN", "off"),
        ],
    )
    .spawn()
    .expect("spawn the worker");

    let held = store
        .job_enqueue(&JobSpec::new("noop", json!({})).queue("mail"))
        .await
        .expect("enqueue")
        .job;
    let free = store
        .job_enqueue(&JobSpec::new("noop", json!({})).queue("bulk"))
        .await
        .expect("enqueue")
        .job;
    // The paused job was due first: a claim across both queues would have taken it no later
    // than the other one.
    wait_for(&store, free.id, |job| job.state == JobState::Succeeded).await;
    let still = store.job_get(held.id).await.expect("job_get");
    assert_eq!(
        (still.state, still.attempts),
        (JobState::Queued, 0),
        "{still:?}"
    );

    ok(&db, &["queue", "resume", "mail"]).await;
    wait_for(&store, held.id, |job| job.state == JobState::Succeeded).await;
    stop(&mut worker).await;
}

/// Ends a worker with SIGTERM and waits for it.
async fn stop(child: &mut Child) {
    let pid = child.id().expect("still running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}");
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the worker stops")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn bad_queue_names_are_refused_and_change_nothing() {
    let db = TestDb::fresh().await;
    let long = "q".repeat(129);
    for (args, says) in [
        (vec!["queue", "pause", "bad\u{7}name"], "control characters"),
        (vec!["queue", "resume", "tab\tname"], "control characters"),
        (vec!["queue", "pause", long.as_str()], "1 to 128 characters"),
        (vec!["queue", "pause", ""], "1 to 128 characters"),
    ] {
        let output = run(&args, &[("DATABASE_URL", db.url())]).await;
        assert_eq!(output.code, Some(1), "{args:?}: {output:?}");
        assert!(output.stderr.contains(says), "{args:?}: {output:?}");
    }
    let store = PgStore::new(db.pool().clone());
    assert_eq!(store.queue_list().await.expect("rows"), []);
}

#[tokio::test]
async fn the_commands_need_a_migrated_database_and_its_url() {
    let db = TestDb::fresh_unmigrated().await;
    for args in [
        &["queue", "list"][..],
        &["queue", "pause", "mail"],
        &["worker", "list"],
    ] {
        let output = run(args, &[("DATABASE_URL", db.url())]).await;
        assert_eq!(output.code, Some(1), "{args:?}: {output:?}");
        assert!(
            output.stderr.contains("run `faultline migrate`"),
            "{args:?}: {output:?}"
        );
    }
    for args in [&["queue", "list"][..], &["worker", "list"]] {
        let output = run(args, &[]).await;
        assert_eq!(output.code, Some(2), "{args:?}: {output:?}");
        assert!(
            output.stderr.contains("--database-url"),
            "{args:?}: {output:?}"
        );
    }
}

#[tokio::test]
async fn worker_list_shows_the_processes_and_marks_the_leader() {
    let db = TestDb::fresh().await;
    let empty = ok(&db, &["worker", "list"]).await;
    assert_eq!(
        empty,
        "no registered processes\nleader: none (no process has led yet)\n"
    );

    let store = PgStore::new(db.pool().clone());
    for (id, role, queues) in [
        ("host-a-17", "worker", vec![("email", 10), ("default", 32)]),
        ("host-b-9", "api", vec![]),
    ] {
        store
            .process_register(&ProcessSpec {
                id: id.into(),
                role: role.into(),
                host: "host".into(),
                pid: 17,
                version: "0.1.0".into(),
                queues: queues
                    .into_iter()
                    .map(|(queue, slots)| QueueSlots {
                        queue: queue.into(),
                        slots,
                    })
                    .collect(),
            })
            .await
            .expect("registered");
    }
    let leadership = store
        .leader_elect(&ElectParams {
            candidate: "host-b-9".into(),
            ttl_ms: 60_000,
        })
        .await
        .expect("elected");

    // Both spellings of the database option work.
    for (args, env) in [
        (vec!["worker", "list", "--database-url", db.url()], vec![]),
        (vec!["worker", "--database-url", db.url(), "list"], vec![]),
        (vec!["worker", "list"], vec![("DATABASE_URL", db.url())]),
    ] {
        let output = run(&args, &env).await;
        assert_eq!(output.code, Some(0), "{args:?}: {output:?}");
        let lines: Vec<Vec<&str>> = output
            .stdout
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 4, "{}", output.stdout);
        assert_eq!(lines[0][0], "ID");
        assert_eq!(lines[0].last(), Some(&"LEADER"));
        assert_eq!(
            lines[1][..6],
            [
                "host-a-17",
                "worker",
                "host",
                "17",
                "0.1.0",
                "email=10,default=32"
            ]
        );
        assert_eq!(lines[1].last(), Some(&"-"));
        assert_eq!(
            lines[2][..6],
            ["host-b-9", "api", "host", "17", "0.1.0", "-"]
        );
        assert_eq!(lines[2].last(), Some(&"yes"));
        assert!(
            output.stdout.lines().last().unwrap().starts_with(&format!(
                "leader: host-b-9 (term {}, elected ",
                leadership.term
            )),
            "{}",
            output.stdout
        );
    }
}

#[tokio::test]
async fn job_expire_lease_ends_a_lease_now_and_refuses_jobs_that_hold_none() {
    let db = TestDb::fresh().await;
    let store = PgStore::new(db.pool().clone());
    let job = store
        .job_enqueue(&JobSpec::new("noop", json!({})).queue("held"))
        .await
        .expect("enqueue")
        .job;
    let claim = ClaimParams {
        queues: vec!["held".into()],
        kinds: Vec::new(),
        limit: 1,
        lease_ms: 365 * 86_400_000,
        worker_id: "vanished".into(),
        claim_id: None,
    };
    let leased = store.job_claim(&claim).await.expect("claim");
    assert_eq!(leased.len(), 1);
    let id = job.id.to_string();

    let printed = ok(&db, &["job", "expire-lease", &id]).await;
    assert!(
        printed.starts_with(&format!(
            "job {id}: lease expired, attempt 1 of 25 counted as failed; queued again, due "
        )),
        "{printed}"
    );
    let expired = store.job_get(job.id).await.expect("get");
    assert_eq!((expired.state, expired.attempts), (JobState::Queued, 1));
    let entry = expired.errors.last().expect("an errors entry");
    assert_eq!(entry.kind.to_string(), "lease_expired");
    assert_eq!(entry.worker.as_deref(), Some("vanished"));
    let lease = faultline_ports::LeaseRef::of(&leased[0]);
    assert_eq!(
        store
            .job_heartbeat_many(&[lease], 30_000)
            .await
            .expect("heartbeat"),
        [faultline_ports::HeartbeatOutcome::Lost],
        "the holder is fenced off"
    );

    let refused = run(&["job", "expire-lease", &id], &[("DATABASE_URL", db.url())]).await;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains(&format!("job {id} is queued, not running")),
        "{refused:?}"
    );
    let unknown = run(
        &["job", "expire-lease", "424242"],
        &[("DATABASE_URL", db.url())],
    )
    .await;
    assert_eq!(unknown.code, Some(1), "{unknown:?}");
    assert!(
        unknown.stderr.contains("job 424242 not found"),
        "{unknown:?}"
    );
    let malformed = run(&["job", "expire-lease", "x"], &[("DATABASE_URL", db.url())]).await;
    assert_eq!(malformed.code, Some(2), "{malformed:?}");
}
