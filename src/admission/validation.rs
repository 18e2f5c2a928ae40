//! Stage 3: local validation of the caller's token (DESIGN.md step 3). A token that fails here
//! never reaches the STS.

use std::sync::Arc;

use super::{Caller, Target};
use crate::error::GatewayError;
use crate::inbound::{Inbound, ValidatedToken};
use crate::state::GatewayState;
use crate::token::CallerToken;

/// Validates the caller's token where the route needs one and has validation configured;
/// `None` when there is nothing to validate.
pub async fn check(
    state: &GatewayState,
    target: &Target,
    caller: &Caller,
) -> Result<Option<Arc<ValidatedToken>>, GatewayError> {
    let validators = state.inbound.get(target.index).cloned().flatten();
    match (validators, &caller.token) {
        (Some(inbound), Some(token)) if target.route.needs_caller_token() => {
            validate(&inbound, token).await.map(Some)
        }
        _ => Ok(None),
    }
}

/// A JWT goes to the JWT validator; anything else to introspection when configured (opaque
/// tokens), else to the JWT validator, which refuses it.
async fn validate(
    inbound: &Inbound,
    caller: &CallerToken,
) -> Result<Arc<ValidatedToken>, GatewayError> {
    let token = caller.as_str();
    let digest = caller.digest();
    let looks_like_jwt = token.bytes().filter(|b| *b == b'.').count() == 2;
    let result = match (&inbound.jwt, &inbound.introspection) {
        (Some(jwt), _) if looks_like_jwt => jwt.validate_digested(token, digest).await,
        (_, Some(introspection)) => introspection.validate_digested(token, digest).await,
        (Some(jwt), None) => jwt.validate_digested(token, digest).await,
        (None, None) => return Err(GatewayError::InvalidToken("no validator".into())),
    };
    result.map_err(GatewayError::from)
}
