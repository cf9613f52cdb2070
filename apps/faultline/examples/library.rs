//! Faultline as a library in your own Rust application: define a handler, enqueue a job inside
//! your own database transaction (it exists exactly when your write commits), and run a worker
//! with `LISTEN` wake-ups and graceful shutdown.
//!
//! Run it against any PostgreSQL (it creates Faultline's schema and a table `example_signups`):
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo run -p faultline --example library
//! ```
//!
//! It stops by itself once the job ran, or on Ctrl-C.

use std::sync::Arc;

use anyhow::Context;
use faultline_ports::JobStore;
use faultline_ports::domain::JobSpec;
use faultline_postgres::PgStore;
use faultline_postgres::listen::{ListenOptions, spawn_listener};
use faultline_worker::{Handler, JobContext, Outcome, Registry, Worker, WorkerConfig};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

/// Sends the welcome email of a new signup (here: prints it).
struct WelcomeEmail {
    /// Fired after the first email, so that this example can stop by itself.
    sent: CancellationToken,
}

#[async_trait::async_trait]
impl Handler for WelcomeEmail {
    async fn run(&self, ctx: JobContext) -> Outcome {
        let Some(email) = ctx.payload["email"].as_str() else {
            // Retrying cannot fix a malformed payload.
            return Outcome::Fail {
                error: "the payload has no email".into(),
            };
        };
        // A real handler calls the mail provider here, passing an idempotency key that is unique
        // per attempt, so that a delivery retried after a crash is not sent twice.
        let key = format!("{}:{}", ctx.id, ctx.fencing_token);
        println!(
            "sending the welcome email to {email} (attempt {}, key {key})",
            ctx.attempt
        );
        self.sent.cancel();
        Outcome::Complete(Some(json!({"sent_to": email})))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let connect: PgConnectOptions = url.parse().context("DATABASE_URL")?;
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect_with(connect.clone())
        .await?;
    faultline_postgres::migrate(&pool).await?;
    sqlx::query(
        "create table if not exists example_signups (id bigserial primary key, email text not null)",
    )
    .execute(&pool)
    .await?;
    let store = PgStore::new(pool.clone());

    // The application's own write and the job commit together, or not at all.
    let mut tx = pool.begin().await?;
    let signup_id: i64 =
        sqlx::query_scalar("insert into example_signups (email) values ($1) returning id")
            .bind("ada@example.com")
            .fetch_one(&mut *tx)
            .await?;
    let payload = json!({"signup_id": signup_id, "email": "ada@example.com"});
    let spec = JobSpec::new("welcome-email", payload)
        .idempotency_key(format!("welcome-email:{signup_id}"));
    let job = store.job_enqueue_in(&mut tx, &spec).await?.job;
    tx.commit().await?;
    println!("signup {signup_id} saved with job {}", job.id);

    // The worker: wake-ups by LISTEN (plus its fallback poll), stopped by a token.
    let sent = CancellationToken::new();
    let mut registry = Registry::new();
    registry.register("welcome-email", WelcomeEmail { sent: sent.clone() });
    let shutdown = CancellationToken::new();
    let wakeups = spawn_listener(connect, ListenOptions::default(), shutdown.child_token());
    let mut worker = Worker::new(Arc::new(store.clone()), registry, WorkerConfig::default())?
        .with_wakeup(wakeups);
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { worker.run(shutdown).await }
    });

    // A service would wait for SIGTERM only; this example also stops once the email went out.
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = sent.cancelled() => {}
    }
    // Graceful: stop claiming, let running jobs finish (up to the grace period), write their
    // outcomes, and give back the leases of any that did not finish.
    shutdown.cancel();
    let report = running.await?;
    println!("worker stopped ({} job(s) interrupted)", report.interrupted);

    let job = store.job_get(job.id).await?;
    println!(
        "job {} is {:?} with result {:?}",
        job.id, job.state, job.result
    );
    pool.close().await;
    Ok(())
}
