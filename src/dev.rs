//! Development tools beside the product: an STS that signs tokens for anyone, an echo backend
//! that shows what arrived, and `txgate demo`, which runs both with the gateway on loopback.
//!
//! Nothing on the request path imports this module (`tests/architecture.rs` keeps it so); only
//! `main` and the tests do.

pub mod demo;
pub mod echo;
pub mod sts;
