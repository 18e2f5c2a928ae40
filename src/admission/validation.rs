//! Stage 3: local validation of the caller's token (DESIGN.md step 3). A token that fails here
//! never reaches the STS.

use std::sync::Arc;

use super::{Caller, Request, Target};
use crate::error::GatewayError;
use crate::exchange::ExchangeProfile;
use crate::inbound::{Inbound, JwtValidator, ValidatedToken};
use crate::state::GatewayState;
use crate::token::CallerToken;

/// The exchange a request runs and the validators of its caller's token.
pub struct Chosen<'s> {
    /// `None` for a public route.
    pub profile: Option<&'s Arc<ExchangeProfile>>,
    /// `None` leaves validation to the STS.
    pub inbound: Option<&'s Arc<Inbound>>,
}

/// The route's exchange and validators; on a route with several token services
/// (`exchange.token_services`), those of the one whose issuer is the token's `iss`. The token
/// is then validated against exactly that issuer, so the service is picked by a validated
/// `iss`. A token of no listed issuer is refused here, before any STS call.
pub fn choose<'s>(
    state: &'s GatewayState,
    target: &Target,
    caller: &Caller,
) -> Result<Chosen<'s>, GatewayError> {
    let choices = state
        .choices
        .get(target.index)
        .map_or(&[][..], Vec::as_slice);
    if choices.is_empty() {
        return Ok(Chosen {
            profile: state.profile(target.index),
            inbound: state.inbound.get(target.index).and_then(Option::as_ref),
        });
    }
    let token = caller.token.as_ref().ok_or(GatewayError::MissingToken)?;
    let claims = crate::jwt::unverified_claims(token.as_str());
    let issuer = claims
        .as_ref()
        .and_then(|c| c.get("iss"))
        .and_then(|v| v.as_str());
    let choice = choices
        .iter()
        .find(|c| Some(c.issuer.as_str()) == issuer)
        .ok_or_else(|| {
            GatewayError::InvalidToken(
                "no token service of the route serves the token's issuer".into(),
            )
        })?;
    Ok(Chosen {
        profile: Some(&choice.profile),
        inbound: Some(&choice.inbound),
    })
}

/// Validates the caller's token where the route needs one and has validation configured;
/// `None` when there is nothing to validate.
pub async fn check(
    chosen: &Chosen<'_>,
    target: &Target,
    caller: &Caller,
) -> Result<Option<Arc<ValidatedToken>>, GatewayError> {
    match (chosen.inbound, &caller.token) {
        (Some(inbound), Some(token)) if target.route.needs_caller_token() => {
            validate(inbound, token).await.map(Some)
        }
        _ => Ok(None),
    }
}

/// An internal route's `Txn-Token` check, read from the request: its validator and the one
/// header value (`None`: missing, repeated or unreadable). `None` when the route checks none.
pub fn txn_token_of<'s>(
    state: &'s GatewayState,
    target: &Target,
    request: Request<'_>,
) -> Option<(&'s Arc<JwtValidator>, Option<String>)> {
    let validator = state.txn_tokens.get(target.index)?.as_ref()?;
    let mut values = request.headers.get_all("txn-token").iter();
    let value = match (values.next(), values.next()) {
        (Some(value), None) => value.to_str().ok().map(str::to_string),
        _ => None,
    };
    Some((validator, value))
}

/// Validates what [`txn_token_of`] read: a Transaction Token of the trust domain, from its
/// Transaction Token Service.
pub async fn check_txn_token(
    read: (&Arc<JwtValidator>, Option<String>),
) -> Result<(), GatewayError> {
    match read {
        (_, None) => Err(GatewayError::TxnTokenRequired),
        (validator, Some(token)) => match validator.validate(&token).await {
            Ok(_) => Ok(()),
            Err(crate::inbound::InboundError::Invalid(why)) => {
                Err(GatewayError::InvalidTxnToken(why))
            }
            Err(other) => Err(other.into()),
        },
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
