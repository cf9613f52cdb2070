//! `cargo xtask tidy`: architecture and house-rule checks, also run as a test.
//!
//! * Dependencies point inward: the domain depends on no IO/async/web crate and on no Faultline
//!   crate; ports depend only on the domain among ours and on no sqlx/tokio/poem; adapters (crates
//!   under `adapters/`) depend on no app (under `apps/`) and no other adapter; nothing depends on
//!   xtask. Normal and build dependencies count; dev-dependencies do not (except on xtask).
//! * Every `.rs` file starts with a `//!` doc line saying what it is for.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

/// Crates the domain must not depend on.
const DOMAIN_FORBIDDEN: &[&str] = &[
    "sqlx",
    "tokio",
    "poem",
    "poem-openapi",
    "async-trait",
    "metrics",
];
/// Crates the ports must not depend on.
const PORTS_FORBIDDEN: &[&str] = &["sqlx", "tokio", "poem", "poem-openapi"];

/// Runs every check and fails with the list of violations.
pub(crate) fn run() -> anyhow::Result<()> {
    let violations = check()?;
    if violations.is_empty() {
        println!("tidy: ok");
        return Ok(());
    }
    bail!(
        "tidy found {} violation(s):\n  - {}",
        violations.len(),
        violations.join("\n  - ")
    )
}

/// Every violation in the workspace, one line each.
pub(crate) fn check() -> anyhow::Result<Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .context("run `cargo metadata`")?;
    if !output.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: Value =
        serde_json::from_slice(&output.stdout).context("parse `cargo metadata` output")?;
    let root = PathBuf::from(
        metadata["workspace_root"]
            .as_str()
            .context("`cargo metadata` has no workspace_root")?,
    );
    let mut violations = check_dependencies(&metadata, &root);
    violations.extend(check_doc_lines(&root)?);
    Ok(violations)
}

/// A workspace crate as the rules see it.
struct Crate {
    name: String,
    /// Its directory relative to the workspace root, e.g. `adapters/postgres`.
    dir: PathBuf,
    /// (dependency name, kind: None for normal, "dev", "build").
    deps: Vec<(String, Option<String>)>,
}

impl Crate {
    fn is_adapter(&self) -> bool {
        self.dir.starts_with("adapters")
    }

    fn is_app(&self) -> bool {
        self.dir.starts_with("apps")
    }

    /// Normal and build dependencies: what ships.
    fn shipped_deps(&self) -> impl Iterator<Item = &str> {
        self.deps
            .iter()
            .filter(|(_, kind)| kind.as_deref() != Some("dev"))
            .map(|(name, _)| name.as_str())
    }
}

fn crates(metadata: &Value, root: &Path) -> Vec<Crate> {
    let packages = metadata["packages"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    packages
        .iter()
        .map(|package| {
            let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap_or_default());
            let dir = manifest
                .parent()
                .and_then(|dir| dir.strip_prefix(root).ok())
                .map(Path::to_path_buf)
                .unwrap_or_default();
            let deps = package["dependencies"]
                .as_array()
                .map_or(&[][..], Vec::as_slice)
                .iter()
                .map(|dep| {
                    (
                        dep["name"].as_str().unwrap_or_default().to_owned(),
                        dep["kind"].as_str().map(str::to_owned),
                    )
                })
                .collect();
            Crate {
                name: package["name"].as_str().unwrap_or_default().to_owned(),
                dir,
                deps,
            }
        })
        .collect()
}

/// The dependency-direction rules over `cargo metadata --no-deps` output.
fn check_dependencies(metadata: &Value, root: &Path) -> Vec<String> {
    let crates = crates(metadata, root);
    let ours = |name: &str| crates.iter().find(|c| c.name == name);
    let mut violations = Vec::new();
    for krate in &crates {
        let name = &krate.name;
        for dep in krate.shipped_deps() {
            if name == "faultline-domain" {
                if DOMAIN_FORBIDDEN.contains(&dep) {
                    violations.push(format!(
                        "faultline-domain depends on {dep} (domain is pure)"
                    ));
                }
                if ours(dep).is_some() {
                    violations.push(format!("faultline-domain depends on workspace crate {dep}"));
                }
            }
            if name == "faultline-ports" {
                if PORTS_FORBIDDEN.contains(&dep) {
                    violations.push(format!(
                        "faultline-ports depends on {dep} (adapter concern)"
                    ));
                }
                if ours(dep).is_some() && dep != "faultline-domain" {
                    violations.push(format!(
                        "faultline-ports depends on workspace crate {dep} (only faultline-domain allowed)"
                    ));
                }
            }
            if krate.is_adapter()
                && let Some(target) = ours(dep)
            {
                if target.is_app() {
                    violations.push(format!("adapter {name} depends on app {dep}"));
                }
                if target.is_adapter() {
                    violations.push(format!("adapter {name} depends on another adapter, {dep}"));
                }
            }
        }
        if krate.deps.iter().any(|(dep, _)| dep == "xtask") {
            violations.push(format!("{name} depends on xtask"));
        }
    }
    violations
}

/// Every `.rs` file under `root` (outside `target/` and hidden directories) must start with `//!`.
fn check_doc_lines(root: &Path) -> anyhow::Result<Vec<String>> {
    let mut violations = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if entry.file_type()?.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    pending.push(path);
                }
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("read {}", path.display()))?;
                if !text.starts_with("//!") {
                    let shown = path.strip_prefix(root).unwrap_or(&path);
                    violations.push(format!(
                        "{} does not start with a `//!` line saying what it is for",
                        shown.display()
                    ));
                }
            }
        }
    }
    violations.sort();
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_workspace_is_tidy() {
        let violations = check().expect("run the checks");
        assert!(
            violations.is_empty(),
            "tidy found {} violation(s):\n  - {}",
            violations.len(),
            violations.join("\n  - ")
        );
    }

    fn package(name: &str, dir: &str, deps: &[(&str, Option<&str>)]) -> Value {
        json!({
            "name": name,
            "manifest_path": format!("/ws/{dir}/Cargo.toml"),
            "dependencies": deps
                .iter()
                .map(|(name, kind)| json!({ "name": name, "kind": kind }))
                .collect::<Vec<_>>(),
        })
    }

    #[test]
    fn every_rule_reports_its_violation() {
        let metadata = json!({ "packages": [
            package("faultline-domain", "domain", &[
                ("serde", None), ("tokio", None), ("faultline-ports", None),
                ("proptest", Some("dev")), ("sqlx", Some("dev")),
            ]),
            package("faultline-ports", "ports", &[
                ("faultline-domain", None), ("async-trait", None), ("sqlx", None),
                ("faultline-memory", None),
            ]),
            package("faultline-memory", "adapters/memory", &[
                ("faultline-ports", None), ("faultline-postgres", None), ("faultline", Some("build")),
            ]),
            package("faultline-postgres", "adapters/postgres", &[
                ("faultline-ports", None), ("faultline-tests", Some("dev")),
            ]),
            package("faultline", "apps/faultline", &[("faultline-postgres", None)]),
            package("faultline-tests", "tests", &[("xtask", Some("dev"))]),
            package("xtask", "xtask", &[("faultline-postgres", None)]),
        ]});
        let violations = check_dependencies(&metadata, Path::new("/ws"));
        let expected = [
            "faultline-domain depends on tokio (domain is pure)",
            "faultline-domain depends on workspace crate faultline-ports",
            "faultline-ports depends on sqlx (adapter concern)",
            "faultline-ports depends on workspace crate faultline-memory (only faultline-domain allowed)",
            "adapter faultline-memory depends on another adapter, faultline-postgres",
            "adapter faultline-memory depends on app faultline",
            "faultline-tests depends on xtask",
        ];
        for line in expected {
            assert!(
                violations.iter().any(|v| v == line),
                "missing {line:?} in {violations:#?}"
            );
        }
        assert_eq!(violations.len(), expected.len(), "{violations:#?}");
    }

    #[test]
    fn files_without_a_doc_line_are_reported() {
        let root = std::env::temp_dir().join(format!("xtask-tidy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["src", "target/debug", ".hidden"] {
            std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        let files = [
            ("src/good.rs", "//! Good.\nfn f() {}\n"),
            ("src/bad.rs", "// not a doc line\n"),
            ("src/empty.rs", ""),
            ("target/debug/generated.rs", "fn g() {}\n"),
            (".hidden/x.rs", "fn h() {}\n"),
            ("src/notes.txt", "no rust here"),
        ];
        for (path, text) in files {
            std::fs::write(root.join(path), text).expect("write");
        }
        let violations = check_doc_lines(&root).expect("check");
        std::fs::remove_dir_all(&root).expect("clean up");
        assert_eq!(
            violations,
            [
                "src/bad.rs does not start with a `//!` line saying what it is for",
                "src/empty.rs does not start with a `//!` line saying what it is for",
            ]
        );
    }
}
