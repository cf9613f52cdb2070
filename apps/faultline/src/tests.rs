//! Tests of the command line: it is well formed, its defaults are the runtime's, flags parse into
//! the configuration, and `--help` and the README show every option with its environment variable.

use std::time::Duration;

use clap::{CommandFactory, Parser};
use faultline_worker::WorkerConfig;

use super::{Cli, Command};

fn parse(args: &[&str]) -> Cli {
    let mut argv = vec!["faultline"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn worker_args(args: &[&str]) -> crate::worker::WorkerCommand {
    let mut argv = vec!["worker", "--database-url", "postgres://x@127.0.0.1/db"];
    argv.extend_from_slice(args);
    match parse(&argv).command {
        Command::Worker(worker) => worker,
        other => panic!("{other:?}"),
    }
}

/// `(long flag, environment variable)` of every option of a subcommand, as clap knows them.
fn options_of(subcommand: &str) -> Vec<(String, Option<String>)> {
    let mut cli = Cli::command();
    cli.build(); // propagates the global (logging) options to the subcommands
    let command = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("no subcommand {subcommand}"));
    command
        .get_arguments()
        .filter(|arg| !arg.is_hide_set())
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            Some((format!("--{long}"), env))
        })
        .filter(|(long, _)| long != "--help" && long != "--version")
        .collect()
}

/// Every environment variable the worker reads: the interface operators configure.
const WORKER_ENV: [&str; 25] = [
    "DATABASE_URL",
    "FAULTLINE_WORKER_ID",
    "FAULTLINE_QUEUES",
    "FAULTLINE_CONCURRENCY",
    "FAULTLINE_LEASE",
    "FAULTLINE_HEARTBEAT_INTERVAL",
    "FAULTLINE_POLL_INTERVAL",
    "FAULTLINE_SHUTDOWN_GRACE",
    "FAULTLINE_COMPLETION_BATCH_SIZE",
    "FAULTLINE_DB_BACKOFF_MIN",
    "FAULTLINE_DB_BACKOFF_MAX",
    "FAULTLINE_STORE_TIMEOUT",
    "FAULTLINE_RESCUE_INTERVAL",
    "FAULTLINE_RESCUE_BATCH_SIZE",
    "FAULTLINE_PRUNE_INTERVAL",
    "FAULTLINE_RETAIN_SUCCEEDED",
    "FAULTLINE_RETAIN_FAILED",
    "FAULTLINE_RETAIN_CANCELLED",
    "FAULTLINE_PRUNE_BATCH_SIZE",
    "FAULTLINE_POOL_SIZE",
    "FAULTLINE_HTTP_ENDPOINTS",
    "FAULTLINE_HTTP_TIMEOUT",
    "FAULTLINE_DEMO_HANDLERS",
    "FAULTLINE_LOG_FORMAT",
    "FAULTLINE_LOG",
];

#[test]
fn cli_is_well_formed() {
    Cli::command().debug_assert();
}

#[test]
fn every_worker_setting_has_a_flag_and_an_environment_variable() {
    let options = options_of("worker");
    // --print-config is the one flag without a variable: it is not configuration.
    let without: Vec<&str> = options
        .iter()
        .filter(|(_, env)| env.is_none())
        .map(|(long, _)| long.as_str())
        .collect();
    assert_eq!(without, ["--print-config"]);
    let mut envs: Vec<&str> = options
        .iter()
        .filter_map(|(_, env)| env.as_deref())
        .collect();
    envs.sort_unstable();
    let mut expected = WORKER_ENV.to_vec();
    expected.sort_unstable();
    assert_eq!(envs, expected);
    // dev has the same options, minus --demo-handlers (always on) and --print-config.
    let dev: Vec<String> = options_of("dev").into_iter().map(|(l, _)| l).collect();
    for (long, _) in &options {
        let dev_lacks = long == "--demo-handlers" || long == "--print-config";
        assert_eq!(dev.contains(long), !dev_lacks, "{long} in dev");
    }
}

#[test]
fn help_shows_every_option_with_its_environment_variable() {
    for subcommand in ["worker", "dev"] {
        let mut cli = Cli::command();
        cli.build();
        let help = cli
            .find_subcommand_mut(subcommand)
            .expect("subcommand")
            .render_long_help()
            .to_string();
        for (long, env) in options_of(subcommand) {
            assert!(help.contains(&long), "{subcommand} --help lacks {long}");
            if let Some(env) = env {
                assert!(
                    help.contains(&format!("[env: {env}")),
                    "{subcommand} --help lacks {env}"
                );
            }
        }
    }
}

#[test]
fn the_readme_documents_every_option() {
    let readme = include_str!("../../../README.md");
    for subcommand in ["worker", "dev"] {
        for (long, env) in options_of(subcommand) {
            assert!(readme.contains(&format!("`{long}")), "README lacks {long}");
            if let Some(env) = env {
                assert!(readme.contains(&format!("`{env}`")), "README lacks {env}");
            }
        }
    }
}

#[test]
fn the_defaults_are_the_runtimes() {
    let args = worker_args(&[]);
    let config = args.worker.config();
    let defaults = WorkerConfig::default();
    assert_eq!(
        config,
        WorkerConfig {
            worker_id: config.worker_id.clone(),
            ..defaults
        }
    );
    assert!(!args.demo_handlers);
    assert!(args.http.endpoints.is_empty());
    assert_eq!(args.worker.pool_size(), 6);
}

#[test]
fn flags_reach_the_configuration() {
    let args = worker_args(&[
        "--worker-id",
        "w1",
        "--queues",
        "mail,billing",
        "--concurrency",
        "64",
        "--lease",
        "2m",
        "--heartbeat-interval",
        "20s",
        "--poll-interval",
        "250ms",
        "--shutdown-grace",
        "5s",
        "--completion-batch-size",
        "7",
        "--db-backoff-min",
        "1s",
        "--db-backoff-max",
        "1m",
        "--store-timeout",
        "3s",
        "--rescue-interval",
        "off",
        "--rescue-batch-size",
        "9",
        "--prune-interval",
        "1h",
        "--retain-succeeded",
        "1d",
        "--retain-failed",
        "30d",
        "--retain-cancelled",
        "2d",
        "--prune-batch-size",
        "11",
        "--pool-size",
        "3",
        "--http-endpoint",
        "a=http://127.0.0.1:9/a",
        "--http-endpoint",
        "b=https://example.invalid/b",
        "--http-timeout",
        "4s",
        "--demo-handlers",
    ]);
    let secs = Duration::from_secs;
    assert_eq!(
        args.worker.config(),
        WorkerConfig {
            worker_id: "w1".into(),
            queues: vec!["mail".into(), "billing".into()],
            concurrency: 64,
            lease: secs(120),
            heartbeat_interval: Some(secs(20)),
            poll_interval: Duration::from_millis(250),
            shutdown_grace: secs(5),
            completion_batch_size: 7,
            db_backoff_min: secs(1),
            db_backoff_max: secs(60),
            store_timeout: secs(3),
            rescue_interval: None,
            rescue_batch_size: 9,
            prune_interval: Some(secs(3_600)),
            retain_succeeded: secs(86_400),
            retain_failed: secs(30 * 86_400),
            retain_cancelled: secs(2 * 86_400),
            prune_batch_size: 11,
        }
    );
    assert_eq!(args.worker.pool_size(), 3);
    let kinds: Vec<&str> = args
        .http
        .endpoints
        .iter()
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(kinds, ["a", "b"]);
    assert_eq!(args.http.http_timeout, secs(4));
    assert!(args.demo_handlers);
}

#[test]
fn bad_values_are_refused_with_the_option_named() {
    let argv = |extra: &[&str]| {
        let mut argv = vec![
            "faultline",
            "worker",
            "--database-url",
            "postgres://x@127.0.0.1/db",
        ];
        argv.extend_from_slice(extra);
        argv.into_iter().map(String::from).collect::<Vec<_>>()
    };
    for (extra, named) in [
        (&["--lease", "30"][..], "--lease"),
        (&["--concurrency", "many"][..], "--concurrency"),
        (&["--http-endpoint", "nourl"][..], "--http-endpoint"),
        (&["--pool-size", "0"][..], "--pool-size"),
        (&["--log-format", "xml"][..], "--log-format"),
    ] {
        let err = Cli::try_parse_from(argv(extra)).expect_err(named);
        assert!(err.to_string().contains(named), "{extra:?}: {err}");
    }
}

#[test]
fn log_options_are_accepted_after_the_subcommand() {
    let cli = parse(&["dev", "--log-format", "json", "--log", "debug,sqlx=warn"]);
    assert_eq!(cli.log.log_format, crate::options::LogFormat::Json);
    assert_eq!(cli.log.log, "debug,sqlx=warn");
}
