//! Route selection: host (exact or `*.suffix`) plus the longest matching `path_prefix`.
//!
//! The table is sorted once at load so that the first matching entry is the answer: longer
//! prefixes first, and for equal prefixes an exact host before a wildcard before no host. A
//! request is then decided in one pass, with no allocation. Prefixes match whole path segments:
//! `/orders` matches `/orders` and `/orders/7` but not `/ordersx`; a prefix ending in `/`
//! matches everything below it.

use std::sync::Arc;

use crate::config::{HostPattern, Route};

/// The routes of one configuration, in match order.
pub struct Router {
    /// (index in the configured order, route), sorted for first-match.
    table: Vec<(usize, Arc<Route>)>,
}

impl Router {
    /// Builds the table from the configured routes (any order).
    pub fn new(routes: &[Arc<Route>]) -> Router {
        let mut table: Vec<(usize, Arc<Route>)> = routes.iter().cloned().enumerate().collect();
        table.sort_by(|(_, a), (_, b)| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                .then_with(|| host_rank(&a.host).cmp(&host_rank(&b.host)))
        });
        Router { table }
    }

    /// The route for a request and its index in the configured order. `host` is the `Host`
    /// header or URI authority, with or without a port; `path` is the URI path, no query.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<(usize, &Arc<Route>)> {
        let host = host.map(strip_port);
        let (index, route) = self.table.iter().find(|(_, route)| {
            prefix_matches(&route.path_prefix, path)
                && match (&route.host, host) {
                    (None, _) => true,
                    (Some(_), None) => false,
                    (Some(pattern), Some(host)) => host_matches(pattern, host),
                }
        })?;
        Some((*index, route))
    }
}

fn host_rank(host: &Option<HostPattern>) -> (u8, usize) {
    match host {
        Some(HostPattern::Exact(_)) => (0, 0),
        // Longer suffixes are more specific.
        Some(HostPattern::Suffix(s)) => (1, usize::MAX - s.len()),
        None => (2, 0),
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

fn host_matches(pattern: &HostPattern, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    match pattern {
        HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
        HostPattern::Suffix(suffix) => {
            host.len() > suffix.len()
                && host.is_char_boundary(host.len() - suffix.len())
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        }
    }
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn router(routes: &str) -> Router {
        let yaml = format!("server: {{ listen: [\"127.0.0.1:0\"] }}\nroutes:\n{routes}");
        let config = Config::from_yaml(&yaml, "test.yaml", &|_| None).unwrap();
        Router::new(&config.routes)
    }

    fn route(name: &str, prefix: &str, host: Option<&str>) -> String {
        let host = host.map(|h| format!(", host: \"{h}\"")).unwrap_or_default();
        format!(
            "  - {{ name: {name}, match: {{ path_prefix: \"{prefix}\"{host} }}, upstream: \"http://127.0.0.1:1\", exchange: {{ mode: none }} }}\n"
        )
    }

    fn found(r: &Router, host: Option<&str>, path: &str) -> Option<String> {
        r.find(host, path).map(|(_, route)| route.name.clone())
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let r = router(
            &(route("root", "/", None)
                + &route("orders", "/orders", None)
                + &route("items", "/orders/items", None)),
        );
        assert_eq!(found(&r, None, "/orders").as_deref(), Some("orders"));
        assert_eq!(found(&r, None, "/orders/7").as_deref(), Some("orders"));
        assert_eq!(found(&r, None, "/orders/items/3").as_deref(), Some("items"));
        assert_eq!(found(&r, None, "/ordersx").as_deref(), Some("root"));
        assert_eq!(found(&r, None, "/").as_deref(), Some("root"));
    }

    #[test]
    fn no_match_without_a_catch_all() {
        let r = router(&route("orders", "/orders", None));
        assert_eq!(found(&r, None, "/other"), None);
        assert_eq!(found(&r, None, "/order"), None);
    }

    #[test]
    fn hosts_exact_and_wildcard() {
        let r = router(
            &(route("exact", "/", Some("api.example.com"))
                + &route("wild", "/", Some("*.example.com"))
                + &route("any", "/", None)),
        );
        assert_eq!(
            found(&r, Some("API.example.com:8080"), "/x").as_deref(),
            Some("exact")
        );
        assert_eq!(
            found(&r, Some("a.b.example.com"), "/x").as_deref(),
            Some("wild")
        );
        assert_eq!(found(&r, Some("example.com"), "/x").as_deref(), Some("any"));
        assert_eq!(found(&r, None, "/x").as_deref(), Some("any"));
    }

    #[test]
    fn longer_prefix_beats_more_specific_host() {
        let r = router(
            &(route("host", "/", Some("api.example.com")) + &route("path", "/orders", None)),
        );
        assert_eq!(
            found(&r, Some("api.example.com"), "/orders/1").as_deref(),
            Some("path")
        );
        assert_eq!(
            found(&r, Some("api.example.com"), "/other").as_deref(),
            Some("host")
        );
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("a.com"), "a.com");
    }
}
