//! Tests of the command line: it is well formed, its defaults are the runtime's, flags parse into
//! the configuration, and `--help` and the README show every option with its environment variable.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use faultline_http::ApiConfig;
use faultline_worker::{MaintenanceConfig, WorkerConfig};

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

fn api_args(args: &[&str]) -> crate::api::ApiCommand {
    let mut argv = vec!["api", "--database-url", "postgres://x@127.0.0.1/db"];
    argv.extend_from_slice(args);
    match parse(&argv).command {
        Command::Api(api) => api,
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
const WORKER_ENV: [&str; 33] = [
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
    "FAULTLINE_MAINTENANCE",
    "FAULTLINE_LEADER_LEASE",
    "FAULTLINE_ELECTION_INTERVAL",
    "FAULTLINE_PROCESS_HEARTBEAT",
    "FAULTLINE_PROCESS_EXPIRY",
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
    "FAULTLINE_METRICS_LISTEN",
    "FAULTLINE_METRICS_SAMPLE_INTERVAL",
    "FAULTLINE_METRICS_MAX_LABEL_VALUES",
    "FAULTLINE_LOG_FORMAT",
    "FAULTLINE_LOG",
];

/// Every environment variable the API reads.
const API_ENV: [&str; 29] = [
    "DATABASE_URL",
    "FAULTLINE_LISTEN",
    "FAULTLINE_API_TOKENS",
    "FAULTLINE_MAX_BODY_BYTES",
    "FAULTLINE_MAX_PAYLOAD_BYTES",
    "FAULTLINE_REQUEST_TIMEOUT",
    "FAULTLINE_RETRY_AFTER",
    "FAULTLINE_LEASE_POLL_INTERVAL",
    "FAULTLINE_API_SHUTDOWN_GRACE",
    "FAULTLINE_HEADER_READ_TIMEOUT",
    "FAULTLINE_IDLE_TIMEOUT",
    "FAULTLINE_MAX_CONNECTIONS",
    "FAULTLINE_API_POOL_SIZE",
    "FAULTLINE_MAINTENANCE",
    "FAULTLINE_LEADER_LEASE",
    "FAULTLINE_ELECTION_INTERVAL",
    "FAULTLINE_PROCESS_HEARTBEAT",
    "FAULTLINE_PROCESS_EXPIRY",
    "FAULTLINE_RESCUE_INTERVAL",
    "FAULTLINE_RESCUE_BATCH_SIZE",
    "FAULTLINE_PRUNE_INTERVAL",
    "FAULTLINE_RETAIN_SUCCEEDED",
    "FAULTLINE_RETAIN_FAILED",
    "FAULTLINE_RETAIN_CANCELLED",
    "FAULTLINE_PRUNE_BATCH_SIZE",
    "FAULTLINE_METRICS_SAMPLE_INTERVAL",
    "FAULTLINE_METRICS_MAX_LABEL_VALUES",
    "FAULTLINE_LOG_FORMAT",
    "FAULTLINE_LOG",
];

/// The subcommands that take configuration options.
const CONFIGURED: [&str; 3] = ["worker", "api", "dev"];

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
}

#[test]
fn every_api_setting_has_a_flag_and_an_environment_variable() {
    let options = options_of("api");
    let without: Vec<&str> = options
        .iter()
        .filter(|(_, env)| env.is_none())
        .map(|(long, _)| long.as_str())
        .collect();
    assert_eq!(without, ["--print-config"]);
    let envs: BTreeSet<&str> = options
        .iter()
        .filter_map(|(_, env)| env.as_deref())
        .collect();
    assert_eq!(envs, API_ENV.into_iter().collect());
}

#[test]
fn dev_takes_the_worker_and_api_options() {
    // Minus --demo-handlers (always on), --print-config and --metrics-listen (dev serves its
    // metrics on the API's /metrics).
    let dev: BTreeSet<(String, Option<String>)> = options_of("dev").into_iter().collect();
    let expected: BTreeSet<(String, Option<String>)> = options_of("worker")
        .into_iter()
        .chain(options_of("api"))
        .filter(|(long, _)| {
            !matches!(
                long.as_str(),
                "--demo-handlers" | "--print-config" | "--metrics-listen"
            )
        })
        .collect();
    assert_eq!(dev, expected);
}

#[test]
fn help_shows_every_option_with_its_environment_variable() {
    for subcommand in CONFIGURED {
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
    for subcommand in CONFIGURED {
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
    let process = crate::maintenance::process("w".into(), "worker", &[]);
    assert_eq!(
        args.maintenance
            .config(process.clone(), defaults.store_timeout),
        MaintenanceConfig::new(process)
    );
    assert!(!args.demo_handlers);
    assert!(args.http.endpoints.is_empty());
    assert_eq!(args.worker.pool_size(), 6);
    assert_eq!(
        args.metrics_listen.0,
        Some(faultline_metrics::DEFAULT_LISTEN)
    );
    assert_eq!(
        args.metrics.sample_interval().unwrap(),
        Some(faultline_metrics::QueueSampler::DEFAULT_INTERVAL)
    );
    assert_eq!(
        args.metrics.max_label_values(),
        faultline_metrics::LabelGuard::DEFAULT_CAP
    );
}

#[test]
fn metrics_flags_parse() {
    let args = worker_args(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--metrics-sample-interval",
        "2s",
        "--metrics-max-label-values",
        "7",
    ]);
    assert_eq!(args.metrics_listen.0, Some("127.0.0.1:0".parse().unwrap()));
    assert_eq!(
        args.metrics.sample_interval().unwrap(),
        Some(Duration::from_secs(2))
    );
    assert_eq!(args.metrics.max_label_values(), 7);
    let args = worker_args(&[
        "--metrics-listen",
        "off",
        "--metrics-sample-interval",
        "off",
    ]);
    assert_eq!(args.metrics_listen.0, None);
    assert_eq!(args.metrics.sample_interval().unwrap(), None);
    let api = api_args(&[
        "--metrics-sample-interval",
        "1m",
        "--metrics-max-label-values",
        "3",
    ]);
    assert_eq!(
        api.metrics.sample_interval().unwrap(),
        Some(Duration::from_secs(60))
    );
    assert_eq!(api.metrics.max_label_values(), 3);
    let zero = worker_args(&["--metrics-sample-interval", "0s"]);
    let error = zero.metrics.sample_interval().expect_err("0s").to_string();
    assert!(error.contains("--metrics-sample-interval"), "{error}");
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
        "--maintenance",
        "off",
        "--leader-lease",
        "9s",
        "--election-interval",
        "2s",
        "--process-heartbeat",
        "4s",
        "--process-expiry",
        "40s",
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
        }
    );
    let process = crate::maintenance::process("w1".into(), "worker", &[]);
    assert_eq!(
        args.maintenance.config(process.clone(), secs(3)),
        MaintenanceConfig {
            lead: false,
            leader_lease: secs(9),
            election_interval: Some(secs(2)),
            process_heartbeat: secs(4),
            process_expiry: secs(40),
            rescue_interval: None,
            rescue_batch_size: 9,
            prune_interval: Some(secs(3_600)),
            retain_succeeded: secs(86_400),
            retain_failed: secs(30 * 86_400),
            retain_cancelled: secs(2 * 86_400),
            prune_batch_size: 11,
            store_timeout: secs(3),
            ..MaintenanceConfig::new(process)
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
fn every_queue_gets_a_producer_with_its_own_slots() {
    let args = worker_args(&[
        "--queues",
        "email=3,default, bulk = 40,email=5",
        "--concurrency",
        "7",
    ]);
    let producers: Vec<(Vec<String>, usize)> = args
        .worker
        .producers()
        .into_iter()
        .map(|p| (p.queues, p.concurrency))
        .collect();
    assert_eq!(
        producers,
        [
            (vec!["email".to_owned()], 5),
            (vec!["default".to_owned()], 7),
            (vec!["bulk".to_owned()], 40),
        ],
        "a repeated queue keeps its last slots; a bare name gets --concurrency"
    );
    // 52 slots / 4 + 4 = 17 connections (and never fewer than two per producer plus two).
    assert_eq!(args.worker.pool_size(), 17);
    for bad in ["email=0", "email=x", "=3", "email=10001", "a\tb"] {
        let mut argv = vec!["faultline", "worker", "--database-url", "postgres://x@h/d"];
        argv.extend(["--queues", bad]);
        let error = Cli::try_parse_from(argv).expect_err(bad).to_string();
        assert!(error.contains("--queues"), "{bad}: {error}");
    }
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
        (&["--metrics-listen", "localhost"][..], "--metrics-listen"),
        (
            &["--metrics-max-label-values", "0"][..],
            "--metrics-max-label-values",
        ),
        (
            &["--metrics-sample-interval", "15"][..],
            "--metrics-sample-interval",
        ),
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

#[test]
fn the_api_defaults_are_the_adapters() {
    let args = api_args(&[]);
    assert!(!args.print_config);
    let config = args.api.config().expect("valid");
    let defaults = ApiConfig::default();
    assert_eq!(config.listen, defaults.listen);
    assert_eq!(config.api_tokens, defaults.api_tokens);
    assert_eq!(config.max_body_bytes, defaults.max_body_bytes);
    assert_eq!(config.max_payload_bytes, defaults.max_payload_bytes);
    assert_eq!(config.request_timeout, defaults.request_timeout);
    assert_eq!(config.retry_after, defaults.retry_after);
    assert_eq!(config.lease_poll_interval, defaults.lease_poll_interval);
    assert_eq!(config.shutdown_grace, defaults.shutdown_grace);
    assert_eq!(args.api.api_pool_size, 10);
}

#[test]
fn api_flags_reach_the_configuration() {
    let args = api_args(&[
        "--listen",
        "127.0.0.1:9001",
        "--api-tokens",
        "t1, t2",
        "--api-tokens",
        "t3",
        "--max-body-bytes",
        "1000",
        "--max-payload-bytes",
        "500",
        "--request-timeout",
        "3s",
        "--retry-after",
        "1500ms",
        "--lease-poll-interval",
        "250ms",
        "--api-shutdown-grace",
        "2s",
        "--api-pool-size",
        "4",
        "--print-config",
    ]);
    assert!(args.print_config);
    assert_eq!(args.api.api_pool_size, 4);
    let config = args.api.config().expect("valid");
    assert_eq!(config.listen, "127.0.0.1:9001".parse().unwrap());
    assert_eq!(config.api_tokens, ["t1", "t2", "t3"], "trimmed");
    assert_eq!(config.max_body_bytes, 1000);
    assert_eq!(config.max_payload_bytes, 500);
    assert_eq!(config.request_timeout, Duration::from_secs(3));
    assert_eq!(config.retry_after, Duration::from_millis(1500));
    assert_eq!(config.lease_poll_interval, Duration::from_millis(250));
    assert_eq!(config.shutdown_grace, Duration::from_secs(2));
    // dev takes the same options.
    let dev = parse(&["dev", "--listen", "127.0.0.1:0", "--api-pool-size", "3"]);
    let Command::Dev(dev) = dev.command else {
        panic!("not dev");
    };
    let shown = format!("{dev:?}");
    assert!(shown.contains("api_pool_size: 3"), "{shown}");
    assert!(shown.contains("127.0.0.1:0"), "{shown}");
}

#[test]
fn api_tokens_are_never_shown() {
    let cli = parse(&[
        "api",
        "--database-url",
        "postgres://x@127.0.0.1/db",
        "--api-tokens",
        "s3cret-one,s3cret-two",
    ]);
    let shown = format!("{cli:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    let Command::Api(api) = cli.command else {
        panic!("not api");
    };
    let config = api.api.config().expect("valid");
    assert!(!format!("{config:?}").contains("s3cret"));
    // Refused tokens are named by position, never by value.
    for (tokens, expected) in [
        ("s3cret,,x", "token 2 is empty"),
        ("s3cret, ", "token 2 is empty"),
        ("  ", "is empty: unset it"),
        ("s3cret,ab\u{7}c", "token 2 contains a control character"),
    ] {
        let args = api_args(&["--api-tokens", tokens]);
        let error = args.api.config().expect_err(tokens).to_string();
        assert!(error.contains(expected), "{tokens:?}: {error}");
        assert!(
            !error.contains("s3cret") && !error.contains("ab"),
            "{error}"
        );
    }
}

#[test]
fn bad_api_values_are_refused_with_the_option_named() {
    for (extra, named) in [
        (&["--listen", "localhost"][..], "--listen"),
        (&["--listen", "127.0.0.1"][..], "--listen"),
        (&["--api-pool-size", "0"][..], "--api-pool-size"),
        (&["--max-body-bytes", "0"][..], "--max-body-bytes"),
        (&["--max-payload-bytes", "1k"][..], "--max-payload-bytes"),
        (&["--request-timeout", "10"][..], "--request-timeout"),
    ] {
        let mut argv = vec!["faultline", "api", "--database-url", "postgres://x@h/db"];
        argv.extend_from_slice(extra);
        let err = Cli::try_parse_from(argv).expect_err(named);
        assert!(err.to_string().contains(named), "{extra:?}: {err}");
    }
    for (extra, named) in [
        (&["--request-timeout", "0s"][..], "--request-timeout"),
        (&["--retry-after", "0ms"][..], "--retry-after"),
        (
            &["--lease-poll-interval", "0s"][..],
            "--lease-poll-interval",
        ),
    ] {
        let error = api_args(extra).api.config().expect_err(named).to_string();
        assert!(error.contains(named), "{extra:?}: {error}");
    }
}
