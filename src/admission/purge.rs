//! After the upstream answered: a token it rejected (`exchange.purge_on_upstream_status`,
//! default `[401]`) is dropped from both cache levels, so no later request is sent with it;
//! and a request that is safe to send again (an idempotent method, no body: RFC 9110 §9.2.2)
//! is sent once more with a freshly exchanged token, so the caller sees the second answer.
//!
//! At most one purge and one retry per request: a second rejection goes to the caller as it
//! is (an upstream that refuses every token costs two exchanges per request, never a loop).
//! Other methods are never sent twice; their token is still dropped, so the caller's next
//! request gets a fresh one.

use super::{Admitted, upstream_token};
use crate::state::GatewayState;

/// What the front door does with the upstream's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterUpstream {
    /// Hand the answer to the caller.
    Forward,
    /// Drop this answer and send the request again: `admitted` now holds a fresh token.
    Retry,
}

/// Decides on the upstream's `status` for `admitted`. `repeatable`: the request may be sent
/// again (idempotent, without a body, not already retried). Called once per upstream answer.
pub async fn after_upstream(
    state: &GatewayState,
    admitted: &mut Admitted,
    status: u16,
    repeatable: bool,
) -> AfterUpstream {
    let Some(profile) = admitted.upstream.profile.clone() else {
        return AfterUpstream::Forward;
    };
    if !profile.settings.purge_on_upstream_status.contains(&status) {
        return AfterUpstream::Forward;
    }
    let (Some(key), Some(sent)) = (admitted.upstream.key, &admitted.upstream.value) else {
        return AfterUpstream::Forward;
    };
    state.cache.purge(key, sent).await;
    let route = state
        .routes
        .get(admitted.target.index)
        .map_or("", |r| r.name.as_str());
    let retried = if repeatable {
        // The route's stage 4 again, for the same caller: the purge made it a miss.
        let fresh = upstream_token::obtain(
            state,
            &admitted.target,
            Some(&profile),
            &admitted.caller,
            None,
            None,
        );
        match fresh.await {
            Ok(fresh) => {
                admitted.upstream = fresh;
                true
            }
            Err(refused) => {
                tracing::debug!(route, error = %refused.error, "no fresh token after the upstream rejected one; its answer goes to the caller");
                false
            }
        }
    } else {
        false
    };
    tracing::debug!(
        route,
        status,
        retried,
        "the upstream rejected the exchanged token; dropped from the cache"
    );
    state
        .metrics
        .upstream_token_purges
        .with_label_values(&[route, if retried { "true" } else { "false" }])
        .inc();
    if retried {
        AfterUpstream::Retry
    } else {
        AfterUpstream::Forward
    }
}
