//! Checks several drills share: every job succeeded with the effect of its last lease, and the
//! work a killed worker had in flight.

use std::collections::BTreeMap;
use std::time::Instant;

use super::db::{DrillDb, JobRow};
use super::fleet::{Fleet, ProcId, describe_exit};
use super::ledger::{Ledger, result_origin};
use super::report::Report;

/// Checks that every job of `ids` succeeded and that its stored result is the answer the sink
/// gave to the execution under the job's final fencing token. Returns how many jobs failed
/// either check (the drill's "lost").
pub(crate) fn succeeded_with_effect(
    report: &mut Report,
    rows: &BTreeMap<i64, JobRow>,
    ledger: &Ledger,
    ids: &[i64],
) -> usize {
    let mut unfinished = Vec::new();
    let mut foreign = Vec::new();
    for id in ids {
        let Some(row) = rows.get(id) else {
            unfinished.push(format!("job {id} is missing"));
            continue;
        };
        if row.state != "succeeded" {
            unfinished.push(format!("job {id} is {}", row.state));
            continue;
        }
        let origin = result_origin(row.result.as_ref());
        let effect = ledger.success_under(*id, row.fencing_token);
        let matches = match (&origin, effect) {
            (Some((worker, token)), Some(effect)) => {
                *token == row.fencing_token && effect.worker == *worker
            }
            _ => false,
        };
        if !matches {
            foreign.push(format!(
                "job {id}: token {}, result from {origin:?}, ledger {:?}",
                row.fencing_token,
                effect.map(|e| (&e.worker, e.token))
            ));
        }
    }
    report.check(
        "every job succeeded (none lost, none stuck)",
        unfinished.is_empty(),
        summary(ids.len(), "succeeded", &unfinished),
    );
    report.check(
        "each result is the effect of the job's last lease (fencing token, ledger)",
        foreign.is_empty(),
        summary(ids.len(), "match", &foreign),
    );
    unfinished.len() + foreign.len()
}

/// `"500 of 500 succeeded"`, or the count that did not and the first few of them.
pub(crate) fn summary(total: usize, what: &str, problems: &[String]) -> String {
    if problems.is_empty() {
        return format!("{total} of {total} {what}");
    }
    let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
    format!(
        "{} of {total} do not: {}{}",
        problems.len(),
        shown.join("; "),
        if problems.len() > shown.len() {
            "; ..."
        } else {
            ""
        }
    )
}

/// A worker that died (killed by the drill or by a poison pill) and what it had in flight.
#[derive(Debug, Clone)]
pub(crate) struct Death {
    /// Its worker id.
    pub(crate) worker: String,
    /// How it ended.
    pub(crate) exit: String,
    /// The jobs still running under its leases after its death.
    pub(crate) in_flight: Vec<i64>,
    /// When it was seen dead.
    pub(crate) at: Instant,
}

/// Records the death of the exited worker `id`: its exit and its jobs in flight (still running
/// under its leases, since it cannot write any more).
pub(crate) async fn death(
    fleet: &Fleet,
    db: &DrillDb,
    id: ProcId,
    status: std::process::ExitStatus,
) -> anyhow::Result<Death> {
    let at = Instant::now();
    let worker = fleet.name(id).to_owned();
    let in_flight = db.running_under(&worker).await?;
    Ok(Death {
        worker,
        exit: describe_exit(status),
        in_flight,
        at,
    })
}
