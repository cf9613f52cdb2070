//! `cargo xtask openapi`: writes the OpenAPI document the HTTP API serves to `docs/openapi.json`
//! (with `--check`: only compares, and fails when the committed file is out of date). The test
//! `the_served_document_is_the_committed_one` in `adapters/http/tests/http/openapi.rs` checks the
//! same thing on every test run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

/// `docs/openapi.json`, relative to the workspace root.
const DOCUMENT: &str = "docs/openapi.json";

/// What `docs/openapi.json` must hold: the served document and a final newline.
pub(crate) fn expected() -> String {
    format!("{}\n", faultline_http::openapi_json())
}

fn document_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(DOCUMENT)
}

/// Writes (or with `check`, compares) the document.
pub(crate) fn run(check: bool) -> anyhow::Result<ExitCode> {
    let path = document_path();
    let expected = expected();
    let committed = match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    if committed.as_deref() == Some(expected.as_str()) {
        println!("{DOCUMENT} is up to date");
        return Ok(ExitCode::SUCCESS);
    }
    if check {
        eprintln!(
            "{DOCUMENT} differs from the document the API serves; run `cargo xtask openapi` and \
             review the diff"
        );
        return Ok(ExitCode::FAILURE);
    }
    std::fs::write(&path, &expected).with_context(|| format!("write {}", path.display()))?;
    println!("wrote {DOCUMENT}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_pretty_json_with_a_final_newline() {
        let text = super::expected();
        assert!(text.ends_with("}\n"), "{}", &text[text.len() - 20..]);
        let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')));
        assert!(doc["paths"]["/v1/jobs"].is_object());
    }
}
