//! txgate: a reverse-proxy gateway that performs OAuth 2.0 Token Exchange (RFC 8693) inline.
//!
//! For each inbound request the gateway matches a route, takes the caller's bearer token,
//! exchanges it at a Security Token Service for a token restricted to the route's audience and
//! scopes, caches the result, and forwards the request with the new token. Backends never see
//! the caller's original token.

pub(crate) mod admin;
pub mod admission;
pub mod assertion;
pub mod cache;
pub mod config;
pub mod describe;
pub mod dev;
pub mod error;
pub mod exchange;
pub mod ext_authz;
pub mod inbound;
pub mod jwt;
pub mod logging;
pub(crate) mod metrics;
pub mod path;
pub mod proxy;
pub(crate) mod redact;
pub mod router;
pub mod secret;
pub mod server;
pub mod state;
pub mod tls;
pub mod token;
