//! The handlers built into the `faultline` binary, and the registry a worker runs with: one `http`
//! handler per configured kind, plus the demo kinds when asked for.

pub(crate) mod demo;
pub(crate) mod http;

use anyhow::bail;
use faultline_worker::Registry;

use crate::options::HttpArgs;

/// The registry for `http` (the configured endpoints) and, with `demo`, the demo kinds. A kind
/// configured twice, or both as an endpoint and a demo kind, is an error.
pub(crate) fn registry(http: &HttpArgs, demo: bool) -> anyhow::Result<Registry> {
    let mut registry = Registry::new();
    if demo {
        registry
            .register("noop", demo::Noop)
            .register("sleep", demo::Sleep)
            .register("fail", demo::Fail)
            .register("crash", demo::Crash);
    }
    if !http.endpoints.is_empty() {
        let client = http::client(http.http_timeout)?;
        for endpoint in &http.endpoints {
            if registry.get(&endpoint.kind).is_some() {
                let what = if demo && demo::KINDS.contains(&endpoint.kind.as_str()) {
                    "a demo kind"
                } else {
                    "configured twice"
                };
                bail!(
                    "--http-endpoint: kind {:?} is {what}; each kind has one handler",
                    endpoint.kind
                );
            }
            let handler = http::HttpHandler::new(client.clone(), endpoint.url.clone());
            registry.register(endpoint.kind.clone(), handler);
        }
    }
    if registry.kinds().is_empty() {
        bail!(
            "no handlers: configure --http-endpoint KIND=URL (FAULTLINE_HTTP_ENDPOINTS) or pass \
             --demo-handlers"
        );
    }
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::options::parse_endpoint;

    fn http(endpoints: &[&str]) -> HttpArgs {
        HttpArgs {
            endpoints: endpoints
                .iter()
                .map(|e| parse_endpoint(e).unwrap())
                .collect(),
            http_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn demo_kinds_only_when_asked() {
        let registry = registry(&http(&["a=http://127.0.0.1:1/"]), false).unwrap();
        assert_eq!(registry.kinds(), ["a"]);
        let registry = registry_with_demo(&http(&["a=http://127.0.0.1:1/"]));
        assert_eq!(registry.kinds(), ["a", "crash", "fail", "noop", "sleep"]);
    }

    fn registry_with_demo(args: &HttpArgs) -> Registry {
        registry(args, true).unwrap()
    }

    #[test]
    fn a_kind_has_one_handler() {
        let twice = registry(&http(&["a=http://x/", "a=http://y/"]), false).unwrap_err();
        assert!(twice.to_string().contains("configured twice"), "{twice}");
        let demo = registry(&http(&["noop=http://x/"]), true).unwrap_err();
        assert!(demo.to_string().contains("a demo kind"), "{demo}");
        // Without the demo kinds, `noop` is just a name.
        assert!(registry(&http(&["noop=http://x/"]), false).is_ok());
    }

    #[test]
    fn no_handlers_is_an_error() {
        let none = registry(&http(&[]), false).unwrap_err();
        assert!(none.to_string().contains("--demo-handlers"), "{none}");
    }
}
