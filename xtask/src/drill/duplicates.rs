//! `duplicates`: 100 concurrent submissions through the API with one idempotency key create one
//! job, and every response names it; the same key with another payload is a 409; the job runs
//! once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use faultline_ports::telemetry::names;
use serde_json::{Value, json};
use tokio::sync::Barrier;

use super::checks::{succeeded_with_effect, summary};
use super::fleet::{LEASE, WorkerSpec, counter};
use super::ledger::{KIND, Sink, payload};
use super::probe::{http_client, scrape, wait_for};
use super::{Ctx, Drill, Report};

pub(crate) const DRILL: Drill = Drill {
    name: "duplicates",
    proves: "100 concurrent submissions with one idempotency key make one job that every response \
             names; the key with another payload is refused (409); the job runs once",
    run: |ctx| Box::pin(run(ctx)),
};

const SUBMISSIONS: usize = 100;

async fn run(ctx: Ctx) -> anyhow::Result<Report> {
    let db = ctx.database().await?;
    let sink = Sink::start().await?;
    let mut fleet = ctx.fleet(db.url())?;
    let (_api, base) = fleet.api("api", &[]).await?;
    let worker = fleet.worker("d1", &WorkerSpec::new(4, LEASE), &sink)?;
    fleet.ready(worker).await?;
    let client = http_client(Duration::from_secs(30))?;
    let url = format!("{base}/v1/jobs");
    let key = format!("drill-duplicates-{}", std::process::id());
    let job = |ms: u64| json!({"kind": KIND, "payload": payload(ms, 0), "idempotency_key": key});

    // All at once: each task waits at the barrier, then submits (again after a 503, which the
    // API allows, with the same key).
    let barrier = Arc::new(Barrier::new(SUBMISSIONS));
    let mut tasks = Vec::new();
    for _ in 0..SUBMISSIONS {
        let (client, url, body, barrier) = (
            client.clone(),
            url.clone(),
            job(10).to_string(),
            barrier.clone(),
        );
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut unavailable = 0;
            loop {
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                let status = response.status().as_u16();
                let body: Value = serde_json::from_str(&response.text().await?)?;
                if status != 503 || Instant::now() >= deadline {
                    return anyhow::Ok((status, body["id"].as_i64(), unavailable));
                }
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.context("a submission task")??);
    }
    ctx.progress(format!("{SUBMISSIONS} concurrent submissions answered"));

    let mut report = Report {
        jobs: 1,
        ..Report::default()
    };
    let created: Vec<i64> = answers
        .iter()
        .filter(|(status, _, _)| *status == 201)
        .filter_map(|(_, id, _)| *id)
        .collect();
    let Some(&id) = created.first() else {
        report.check(
            "one submission created the job (201)",
            false,
            format!("{answers:?}"),
        );
        return Ok(report);
    };
    report.check_eq(
        "exactly one submission created the job (201)",
        1,
        created.len(),
    );
    let others: Vec<String> = answers
        .iter()
        .filter(|(status, got, _)| !(matches!(status, 200 | 201) && *got == Some(id)))
        .map(|(status, got, _)| format!("{status} naming {got:?}"))
        .collect();
    report.check(
        "every response names that job (201 once, 200 for the rest)",
        others.is_empty(),
        summary(SUBMISSIONS, "did", &others),
    );
    let retried: usize = answers.iter().map(|(_, _, n)| n).sum();
    if retried > 0 {
        report.note(format!("{retried} submissions were retried after a 503"));
    }
    let jobs: Vec<(i64, Option<String>)> =
        sqlx::query_as("select id, idempotency_key from faultline_jobs order by id")
            .fetch_all(db.pool())
            .await?;
    report.check_eq(
        "the database holds that one job, with the key",
        vec![(id, Some(key.clone()))],
        jobs,
    );

    // The key with another payload: a conflict, and nothing new.
    let conflict = client
        .post(&url)
        .header("content-type", "application/json")
        .body(job(11).to_string())
        .send()
        .await?;
    let status = conflict.status().as_u16();
    let problem: Value = serde_json::from_str(&conflict.text().await?).unwrap_or_default();
    report.check(
        "the same key with another payload is refused: 409 idempotency-conflict naming the job",
        status == 409
            && problem["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("/idempotency-conflict"))
            && problem["job_id"] == id,
        format!("{status} {problem}"),
    );
    let count: i64 = sqlx::query_scalar("select count(*) from faultline_jobs")
        .fetch_one(db.pool())
        .await?;
    report.check_eq("the conflict created nothing", 1, count);

    // The API counted one enqueue and the rest as replays.
    let metrics = scrape(&client, &format!("{base}/metrics")).await?;
    let counted = (
        counter(metrics.value(names::JOBS_ENQUEUED_TOTAL, &[("kind", KIND)])),
        counter(metrics.value(names::IDEMPOTENT_REPLAYS_TOTAL, &[])),
    );
    report.check_eq(
        "the API's metrics: 1 enqueue, the other submissions replays",
        (1, (SUBMISSIONS - 1) as u64),
        counted,
    );

    // The one job runs once.
    wait_for("the job completes", Duration::from_secs(30), async || {
        let states = db.states().await?;
        Ok(if states.get("succeeded") == Some(&1) {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        })
    })
    .await?;
    let rows = db.jobs().await?;
    let ledger = sink.ledger();
    report.lost = succeeded_with_effect(&mut report, &rows, &ledger, &[id]);
    report.repeated = ledger.repeated(|_| 1);
    report.check_eq("the job executed once", 1, ledger.effects().len());
    report.stale_rejected = Some(fleet.stale_rejected().await?);
    Ok(report)
}
