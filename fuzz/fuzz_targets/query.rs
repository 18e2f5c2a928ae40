//! `access_token` removal from query strings (RFC 6750 §2.3): whatever the query, no parameter
//! that decodes to `access_token` is left for the upstream, and every other one is kept.

#![no_main]

use libfuzzer_sys::fuzz_target;

fn decoded_key(pair: &str) -> String {
    url::form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(k, _)| k.into_owned())
        .unwrap_or_default()
}

fuzz_target!(|query: &str| {
    let found = query
        .split('&')
        .filter(|p| decoded_key(p) == "access_token")
        .count();
    let Some(stripped) = txgate::admission::credential::strip_query_token(query) else {
        // Nothing to remove: the query is forwarded as sent.
        assert_eq!(found, 0, "missed in {query:?}");
        return;
    };
    let (rest, removed) = (stripped.rest.unwrap_or_default(), stripped.removed);
    for pair in rest.split('&') {
        assert_ne!(decoded_key(pair), "access_token", "left in {rest:?}");
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && decoded_key(p) != "access_token")
        .collect();
    assert_eq!(rest, kept.join("&"));
    assert_eq!(removed.len(), found);
});
