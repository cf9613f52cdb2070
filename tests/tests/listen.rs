//! Tests of the Postgres wake-up listener (`faultline_postgres::listen`): it bumps its counter
//! once connected and on every notification of the queues it serves, reconnects (and bumps) after
//! its backend is terminated, after an outage and after its connection goes silent, and stops when
//! told to. Outages and silent connections are made with a small TCP proxy in front of the server.

use std::sync::Arc;
use std::time::Duration;

use faultline_ports::JobStore;
use faultline_ports::domain::JobSpec;
use faultline_postgres::PgStore;
use faultline_postgres::listen::{APPLICATION_NAME, ListenOptions, spawn_listener};
use faultline_tests::TestDb;
use serde_json::json;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Longest wait for something that must happen.
const DEADLINE: Duration = Duration::from_secs(30);

/// Waits for the next bump and returns the counter's value.
async fn next_value(wakeups: &mut watch::Receiver<u64>) -> u64 {
    tokio::time::timeout(DEADLINE, wakeups.changed())
        .await
        .expect("no wake-up before the deadline")
        .expect("the listener stopped");
    *wakeups.borrow_and_update()
}

async fn enqueue(pool: &PgPool, queue: &str) {
    PgStore::new(pool.clone())
        .job_enqueue(&JobSpec::new("test", json!({})).queue(queue))
        .await
        .expect("enqueue");
}

/// The backend pids of this database's listener connections.
async fn listener_pids(pool: &PgPool) -> Vec<i32> {
    sqlx::query_scalar(
        "select pid from pg_stat_activity
         where application_name = $1 and datname = current_database() order by pid",
    )
    .bind(APPLICATION_NAME)
    .fetch_all(pool)
    .await
    .expect("pg_stat_activity")
}

/// Fast reconnects and probes, so that tests finish quickly.
fn quick() -> ListenOptions {
    ListenOptions::default()
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn bumps_once_connected_and_on_every_enqueue() {
    let db = TestDb::fresh().await;
    let shutdown = CancellationToken::new();
    let mut wakeups = spawn_listener(db.connect_options(), quick(), shutdown.clone());
    assert_eq!(*wakeups.borrow(), 0, "no bump before the first connection");

    assert_eq!(next_value(&mut wakeups).await, 1, "bump on connect");
    enqueue(db.pool(), "default").await;
    assert_eq!(next_value(&mut wakeups).await, 2);
    enqueue(db.pool(), "other").await;
    assert_eq!(next_value(&mut wakeups).await, 3);
    assert_eq!(listener_pids(db.pool()).await.len(), 1);
    shutdown.cancel();
}

#[tokio::test]
async fn bumps_for_the_queues_it_serves() {
    let db = TestDb::fresh().await;
    let shutdown = CancellationToken::new();
    let options = quick().queues(["mine"]);
    let mut wakeups = spawn_listener(db.connect_options(), options, shutdown.clone());
    assert_eq!(next_value(&mut wakeups).await, 1);
    enqueue(db.pool(), "mine").await;
    assert_eq!(next_value(&mut wakeups).await, 2);
    shutdown.cancel();
}

#[tokio::test]
async fn reconnects_and_bumps_after_its_backend_is_terminated() {
    let db = TestDb::fresh().await;
    let shutdown = CancellationToken::new();
    let mut wakeups = spawn_listener(db.connect_options(), quick(), shutdown.clone());
    assert_eq!(next_value(&mut wakeups).await, 1);
    let before = listener_pids(db.pool()).await;
    assert_eq!(before.len(), 1, "{before:?}");

    let terminated: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
        .bind(before[0])
        .fetch_one(db.pool())
        .await
        .expect("pg_terminate_backend");
    assert!(terminated);

    // Nothing was enqueued: this bump is the reconnect's (notifications may have been missed).
    assert_eq!(next_value(&mut wakeups).await, 2, "bump after reconnect");
    let after = listener_pids(db.pool()).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after, before, "a new connection listens");

    enqueue(db.pool(), "default").await;
    assert_eq!(
        next_value(&mut wakeups).await,
        3,
        "the new connection listens"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn keeps_retrying_through_an_outage_and_resumes() {
    let db = TestDb::fresh().await;
    let proxy = Proxy::start(&db).await;
    let shutdown = CancellationToken::new();
    let options = db.connect_options().host("127.0.0.1").port(proxy.port);
    let mut wakeups = spawn_listener(options, quick(), shutdown.clone());
    assert_eq!(next_value(&mut wakeups).await, 1);

    // The database "goes away": connections are cut and new ones refused.
    proxy.set(Mode::Refuse);
    let mut accepted = proxy.accepted.subscribe();
    let seen = *accepted.borrow_and_update();
    // Several refused connects in a row: the listener keeps trying and does not bump.
    for _ in 0..3 {
        tokio::time::timeout(DEADLINE, accepted.changed())
            .await
            .expect("the listener stopped trying to connect")
            .expect("proxy gone");
    }
    assert!(*accepted.borrow() >= seen + 3);
    assert_eq!(
        *wakeups.borrow_and_update(),
        1,
        "no bump while disconnected"
    );

    proxy.set(Mode::Pass);
    assert_eq!(next_value(&mut wakeups).await, 2, "bump after reconnect");
    enqueue(db.pool(), "default").await;
    assert_eq!(next_value(&mut wakeups).await, 3);
    shutdown.cancel();
}

#[tokio::test]
async fn a_silent_connection_is_caught_by_the_probe_and_replaced() {
    let db = TestDb::fresh().await;
    let proxy = Proxy::start(&db).await;
    let shutdown = CancellationToken::new();
    let connect = db.connect_options().host("127.0.0.1").port(proxy.port);
    let options = quick().probe(Duration::from_millis(100), Duration::from_millis(300));
    let mut wakeups = spawn_listener(connect, options, shutdown.clone());
    assert_eq!(next_value(&mut wakeups).await, 1);
    let old = listener_pids(db.pool()).await;

    // The connection stays open but nothing passes any more (a half-open connection): without
    // the probe the listener would wait forever.
    proxy.set(Mode::FreezeExisting);
    assert_eq!(
        next_value(&mut wakeups).await,
        2,
        "bump after the probe failed"
    );
    enqueue(db.pool(), "default").await;
    assert_eq!(next_value(&mut wakeups).await, 3);
    let now = listener_pids(db.pool()).await;
    assert!(now.iter().any(|pid| !old.contains(pid)), "{old:?} {now:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn stops_and_disconnects_when_shutdown_fires() {
    let db = TestDb::fresh().await;
    let shutdown = CancellationToken::new();
    let mut wakeups = spawn_listener(db.connect_options(), quick(), shutdown.clone());
    assert_eq!(next_value(&mut wakeups).await, 1);

    shutdown.cancel();
    let closed =
        tokio::time::timeout(DEADLINE, async { while wakeups.changed().await.is_ok() {} }).await;
    assert!(closed.is_ok(), "the listener task outlived its shutdown");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !listener_pids(db.pool()).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listener's connection outlived its task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a wait for
    }
}

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward bytes both ways.
    Pass,
    /// Close every connection and accept-then-close new ones (the server is "down").
    Refuse,
    /// Stop forwarding on the connections open now, keeping them open; new ones pass.
    FreezeExisting,
}

/// A TCP proxy on 127.0.0.1 in front of the test server.
struct Proxy {
    port: u16,
    mode: watch::Sender<(Mode, u64)>,
    /// Connections accepted so far.
    accepted: Arc<watch::Sender<u64>>,
}

impl Proxy {
    async fn start(db: &TestDb) -> Proxy {
        let options = db.connect_options();
        let upstream = format!("{}:{}", options.get_host(), options.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (mode, modes) = watch::channel((Mode::Pass, 0_u64));
        let accepted = Arc::new(watch::Sender::new(0_u64));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                counter.send_modify(|n| *n += 1);
                let modes = modes.clone();
                if modes.borrow().0 == Mode::Refuse {
                    drop(client);
                    continue;
                }
                tokio::spawn(relay(client, upstream.clone(), modes));
            }
        });
        Proxy {
            port,
            mode,
            accepted,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.send_modify(|(m, epoch)| {
            *m = mode;
            *epoch += 1;
        });
    }
}

/// Forwards one connection until it closes, the proxy refuses, or it is frozen (then it holds
/// both sockets open without forwarding until the proxy refuses).
async fn relay(mut client: TcpStream, upstream: String, mut modes: watch::Receiver<(Mode, u64)>) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let start_epoch = modes.borrow_and_update().1;
    let frozen = loop {
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
            changed = modes.changed() => {
                if changed.is_err() {
                    return;
                }
                let (mode, epoch) = *modes.borrow_and_update();
                match mode {
                    Mode::Pass => {}
                    Mode::Refuse => return,
                    Mode::FreezeExisting if epoch > start_epoch => break true,
                    Mode::FreezeExisting => {}
                }
            }
        }
    };
    if frozen {
        loop {
            if modes.changed().await.is_err() || modes.borrow_and_update().0 == Mode::Refuse {
                return;
            }
        }
    }
}
