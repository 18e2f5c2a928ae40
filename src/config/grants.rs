//! The exchanges beyond one call at one token service: chains of steps
//! (`exchange.chain`), a token service chosen by the caller's issuer (`exchange.token_services`),
//! Transaction Tokens (`mode: transaction_token`) and the validation of incoming ones
//! (`inbound.txn_token`).

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::file::{ChainStepFile, ContextAttributeFile, ExchangeFile, ModeFile, TxnTokenFile};
use super::inbound::JwtSettings;
use super::token_service::{INBOUND_CACHE_ENTRIES, jwt_algorithms, jwt_leeway};
use super::{
    ACCESS_TOKEN_TYPE, BuildResult, ConfigProblem, ContextAttribute, Exchange, ExchangeSettings,
    Grant, IssuerChoice, ModeKind, ModeSettings, TXN_TOKEN_TYPE, TokenServiceSettings, defaults,
    http_url,
};

/// The most steps a chain may have: every step is an STS call on a miss.
pub const MAX_CHAIN_STEPS: usize = 4;

/// The JOSE `typ` of a Transaction Token.
pub const TXN_TOKEN_TYP: &str = "txntoken+jwt";

type Services = BTreeMap<String, Arc<TokenServiceSettings>>;

/// Keys that a route's exchange may not set where `why` says where they go instead.
fn refuse_keys(path: &str, keys: &[(&str, bool)], why: &str) -> BuildResult<()> {
    match keys.iter().find(|(_, set)| *set) {
        Some((key, _)) => Err(ConfigProblem::new(format!("{path}.{key}"), why)),
        None => Ok(()),
    }
}

/// `exchange.chain`: each step an impersonation at its token service, whose subject is the
/// caller's token (step 1) or the previous step's result. The route's settings hold the steps;
/// its cache key prefix covers every step, so the final token is cached under all of them.
pub(super) fn chain(
    path: &str,
    raw: ExchangeFile,
    steps: Vec<ChainStepFile>,
    services: &Services,
) -> BuildResult<Arc<ExchangeSettings>> {
    if raw.mode != ModeFile::Impersonation {
        return Err(ConfigProblem::new(
            format!("{path}.chain"),
            "a chain's first subject is the caller's token: use mode impersonation",
        ));
    }
    refuse_keys(
        path,
        &[
            ("token_service", raw.token_service.is_some()),
            ("token_services", raw.token_services.is_some()),
            ("grant", raw.grant.is_some()),
            ("audience", !raw.audience.is_empty()),
            ("resource", !raw.resource.is_empty()),
            ("scope", raw.scope.is_some()),
            ("subject_token_type", raw.subject_token_type.is_some()),
            ("requested_token_type", raw.requested_token_type.is_some()),
        ],
        "a chain sets this on its steps (exchange.chain[])",
    )?;
    if !(2..=MAX_CHAIN_STEPS).contains(&steps.len()) {
        return Err(ConfigProblem::new(
            format!("{path}.chain"),
            format!(
                "a chain has 2 to {MAX_CHAIN_STEPS} steps (one exchange is written without chain); \
                 this one has {}",
                steps.len()
            ),
        ));
    }
    let mut built: Vec<Arc<ExchangeSettings>> = Vec::with_capacity(steps.len());
    for (i, step) in steps.into_iter().enumerate() {
        let step_path = format!("{path}.chain[{i}]");
        let ChainStepFile {
            token_service,
            grant,
            audience,
            resource,
            scope,
            subject_token_type,
            requested_token_type,
        } = step;
        let service = super::service_named(
            &format!("{step_path}.token_service"),
            Some(token_service),
            services,
            ModeFile::Impersonation,
        )?;
        // Past step 1, the subject is what the previous step asked for.
        let subject_token_type = subject_token_type.or_else(|| {
            built
                .last()
                .and_then(|previous| previous.requested_token_type.clone())
                .filter(|_| grant != Some(super::file::GrantFile::JwtBearer))
        });
        let file = ExchangeFile {
            mode: ModeFile::Impersonation,
            token_service: None,
            token_services: None,
            grant,
            chain: None,
            trust_domain: None,
            purpose: None,
            request_context: None,
            audience,
            resource,
            scope,
            subject_token_type,
            requested_token_type,
            actor: None,
            require_may_act: false,
            caller: None,
            // Intermediate tokens never reach an upstream; the route's list applies to the last.
            purge_on_upstream_status: Some(Vec::new()),
        };
        let mut settings = super::build_single(&step_path, file, service)?;
        if let Some(previous) = built.last() {
            settings.key_prefix = chained_prefix(&previous.key_prefix, &settings.key_prefix);
        }
        built.push(Arc::new(settings));
    }
    let (first, last) = match (built.first(), built.last()) {
        (Some(first), Some(last)) => (first.clone(), last.clone()),
        _ => unreachable!("a chain has at least two steps"),
    };
    Ok(Arc::new(ExchangeSettings {
        purge_on_upstream_status: super::purge_statuses(path, raw.purge_on_upstream_status)?,
        grant: first.grant,
        // The caller's token is validated as the first token service's.
        service: first.service.clone(),
        subject_token_type: first.subject_token_type.clone(),
        actor_token_type: String::new(),
        requested_token_type: last.requested_token_type.clone(),
        params: Vec::new(),
        key_prefix: last.key_prefix,
        mode: ModeSettings::Chain { steps: built },
    }))
}

/// A step's cache key prefix: over the steps before it and its own profile, so a step's
/// result is shared only by chains that agree up to it.
fn chained_prefix(previous: &[u8; 32], own: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"txgate-chain-step-v1");
    h.update(previous);
    h.update(own);
    h.finalize().into()
}

/// `exchange.token_services`: the same exchange at each listed token service; the caller's
/// validated `iss` picks one, so each must validate JWTs of an issuer of its own.
pub(super) fn by_issuer(
    path: &str,
    raw: ExchangeFile,
    names: Vec<String>,
    services: &Services,
) -> BuildResult<Exchange> {
    refuse_keys(
        path,
        &[("token_service", raw.token_service.is_some())],
        "set token_service or token_services, not both",
    )?;
    if raw.mode == ModeFile::TransactionToken {
        return Err(ConfigProblem::new(
            format!("{path}.token_services"),
            "mode transaction_token asks the trust domain's one Transaction Token Service; \
             use token_service",
        ));
    }
    if raw.caller == Some(super::file::CallerFile::Anonymous) {
        return Err(ConfigProblem::new(
            format!("{path}.caller"),
            "the caller's issuer picks the token service, so callers must send a token; \
             remove caller: anonymous",
        ));
    }
    if names.len() < 2 {
        return Err(ConfigProblem::new(
            format!("{path}.token_services"),
            "list at least two token services (one is written token_service)",
        ));
    }
    let mut choices: Vec<IssuerChoice> = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let at = format!("{path}.token_services[{i}]");
        let service = super::service_named(&at, Some(name.clone()), services, raw.mode)?;
        let inbound = service.inbound.clone().filter(|i| i.jwt.is_some());
        let Some(inbound) = inbound else {
            return Err(ConfigProblem::new(
                at,
                format!(
                    "token service \"{name}\" has no inbound.jwt: the caller's iss picks the \
                     token service, so each one needs JWT validation of its issuer"
                ),
            ));
        };
        let jwt = inbound.jwt.as_ref().expect("filtered on jwt above");
        if let Some(same) = choices.iter().find(|c| c.issuer == jwt.issuer) {
            return Err(ConfigProblem::new(
                at,
                format!(
                    "token services \"{}\" and \"{name}\" validate the same issuer \"{}\"; the \
                     issuer could not tell them apart",
                    same.exchange.service.name, jwt.issuer
                ),
            ));
        }
        let mut file = raw.clone();
        file.token_service = None;
        let settings = super::build_single(path, file, service)?;
        if settings.mode.kind() == ModeKind::ClientCredentials && jwt.audiences.is_empty() {
            return Err(ConfigProblem::new(
                format!("token_services.{name}.inbound.jwt.audiences"),
                "a client_credentials route forwards the gateway's own token, so it must require \
                 an audience of the caller's token (any token of the issuer would do otherwise)",
            ));
        }
        choices.push(IssuerChoice {
            issuer: jwt.issuer.clone(),
            exchange: Arc::new(settings),
            inbound,
        });
    }
    Ok(Exchange::ByIssuer(choices.into()))
}

/// `mode: transaction_token`: a token exchange at the trust domain's Transaction Token
/// Service for every request, with the trust domain as `audience`, the purpose as `scope` and
/// the configured request attributes as `request_context`.
pub(super) fn transaction_token(
    path: &str,
    raw: ExchangeFile,
    services: &Services,
) -> BuildResult<Arc<ExchangeSettings>> {
    refuse_keys(
        path,
        &[
            ("audience", !raw.audience.is_empty()),
            ("scope", raw.scope.is_some()),
        ],
        "mode transaction_token sends trust_domain as the audience and purpose as the scope; \
         set those instead",
    )?;
    refuse_keys(
        path,
        &[
            ("resource", !raw.resource.is_empty()),
            ("requested_token_type", raw.requested_token_type.is_some()),
            ("grant", raw.grant.is_some()),
        ],
        "mode transaction_token always asks for a txn_token by token exchange; remove this key",
    )?;
    refuse_keys(
        path,
        &[(
            "purge_on_upstream_status",
            raw.purge_on_upstream_status.is_some(),
        )],
        "a Transaction Token is obtained for each request and never cached; remove this key",
    )?;
    let service = super::service_named(
        &format!("{path}.token_service"),
        raw.token_service.clone(),
        services,
        raw.mode,
    )?;
    let trust_domain = raw.trust_domain.filter(|t| !t.is_empty()).ok_or_else(|| {
        ConfigProblem::new(
            format!("{path}.trust_domain"),
            "required by mode transaction_token (the audience of every Txn-Token)",
        )
    })?;
    let purpose = raw.purpose.ok_or_else(|| {
        ConfigProblem::new(
            format!("{path}.purpose"),
            "required by mode transaction_token (the scope of every Txn-Token)",
        )
    })?;
    let mut context: Vec<ContextAttribute> = Vec::new();
    let attributes = raw.request_context.unwrap_or_else(|| {
        vec![
            ContextAttributeFile::Method,
            ContextAttributeFile::Path,
            ContextAttributeFile::ClientAddress,
        ]
    });
    for (i, attribute) in attributes.into_iter().enumerate() {
        let attribute = match attribute {
            ContextAttributeFile::Method => ContextAttribute::Method,
            ContextAttributeFile::Path => ContextAttribute::Path,
            ContextAttributeFile::ClientAddress => ContextAttribute::ClientAddress,
        };
        if context.contains(&attribute) {
            return Err(ConfigProblem::new(
                format!("{path}.request_context[{i}]"),
                "listed twice",
            ));
        }
        context.push(attribute);
    }
    let subject_token_type = match raw.subject_token_type {
        Some(t) => super::token_type(&format!("{path}.subject_token_type"), &t)?,
        None => ACCESS_TOKEN_TYPE.to_string(),
    };
    let params = super::exchange_params(
        path,
        vec![trust_domain],
        Vec::new(),
        Some(purpose),
        Some(TXN_TOKEN_TYPE.to_string()),
    )
    .map_err(|p| match p.path.rsplit('.').next() {
        Some("scope") => ConfigProblem::new(format!("{path}.purpose"), p.message),
        Some(_) | None => p,
    })?;
    let key_prefix = super::profile_digest(
        ModeKind::TransactionToken,
        Grant::TokenExchange,
        &service,
        &subject_token_type,
        &params,
        "",
    );
    Ok(Arc::new(ExchangeSettings {
        mode: ModeSettings::TransactionToken { context },
        grant: Grant::TokenExchange,
        service,
        subject_token_type,
        actor_token_type: String::new(),
        requested_token_type: Some(TXN_TOKEN_TYPE.to_string()),
        params,
        key_prefix,
        purge_on_upstream_status: Vec::new(),
    }))
}

/// `inbound.txn_token`: a JWT validator that accepts only Transaction Tokens (`typ`
/// `txntoken+jwt`) of the trust domain (`aud`) from its Transaction Token Service (`iss`).
pub(super) fn txn_token(path: &str, raw: TxnTokenFile) -> BuildResult<JwtSettings> {
    let TxnTokenFile {
        trust_domain,
        issuer,
        jwks_uri,
        algorithms,
        leeway,
    } = raw;
    if trust_domain.is_empty() {
        return Err(ConfigProblem::new(
            format!("{path}.trust_domain"),
            "must not be empty",
        ));
    }
    if issuer.is_empty() {
        return Err(ConfigProblem::new(
            format!("{path}.issuer"),
            "must not be empty",
        ));
    }
    let jwks_uri = http_url(&format!("{path}.jwks_uri"), &jwks_uri)?;
    let algorithms = jwt_algorithms(&format!("{path}.algorithms"), &algorithms)?;
    let leeway = jwt_leeway(&format!("{path}.leeway"), leeway)?;
    Ok(JwtSettings {
        issuer,
        jwks_uri,
        audiences: vec![trust_domain],
        algorithms,
        leeway,
        refresh_interval: defaults::JWKS_REFRESH_INTERVAL,
        min_refetch_interval: defaults::JWKS_MIN_REFETCH_INTERVAL,
        max_cached: INBOUND_CACHE_ENTRIES,
        typ: Some(TXN_TOKEN_TYP.to_string()),
    })
}
