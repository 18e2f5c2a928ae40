//! The live side of a configuration's exchanges, built from its settings once per
//! configuration: each token service with its HTTP client and breaker, and each route's
//! profile with the mode's live data (the actor token file, or the profile of the gateway's own
//! actor token).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::actor::TokenFile;
use super::resilience::Resilience;
use crate::config::{
    ActorSettings, CallerPolicy, ConfigProblem, ContextAttribute, ExchangeSettings, ModeSettings,
    TokenServiceSettings,
};

/// A token service the gateway calls: its settings, and the client and breaker every call
/// through it shares.
pub struct TokenService {
    pub settings: Arc<TokenServiceSettings>,
    /// Built once with the connect timeout; the total timeout is set per call.
    pub http: reqwest::Client,
    /// Concurrency cap, retries and circuit breaker.
    pub resilience: Resilience,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.settings.fmt(f)
    }
}

impl TokenService {
    /// The live token service for `settings`; `path` names it in the error.
    pub fn build(path: &str, settings: &Arc<TokenServiceSettings>) -> Result<Self, ConfigProblem> {
        let http = super::http_client(settings.connect_timeout).map_err(|e| {
            ConfigProblem::new(
                path,
                format!("cannot build the HTTP client for this token service: {e}"),
            )
        })?;
        Ok(TokenService {
            settings: settings.clone(),
            http,
            resilience: Resilience::new(settings.resilience.clone()),
        })
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }
}

/// The token services of one configuration, by name.
pub type TokenServices = BTreeMap<String, Arc<TokenService>>;

/// Builds every token service of a configuration.
pub fn token_services(
    settings: &BTreeMap<String, Arc<TokenServiceSettings>>,
) -> Result<TokenServices, ConfigProblem> {
    settings
        .iter()
        .map(|(name, s)| {
            let service = TokenService::build(&format!("token_services.{name}"), s)?;
            Ok((name.clone(), Arc::new(service)))
        })
        .collect()
}

/// A route's exchange as it runs: what to ask ([`ExchangeSettings`]), where (the live
/// [`TokenService`]) and the mode's live data.
pub struct ExchangeProfile {
    pub settings: Arc<ExchangeSettings>,
    pub mode: Mode,
    pub service: Arc<TokenService>,
}

impl std::fmt::Debug for ExchangeProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExchangeProfile")
            .field("mode", &self.mode)
            .field("service", &self.service.settings.name)
            .finish_non_exhaustive()
    }
}

/// The exchange modes that call an STS, with their live data.
#[derive(Debug)]
pub enum Mode {
    /// The caller's token is the subject; no actor.
    Impersonation,
    /// The caller's token is the subject; the gateway's (or a configured) token is the actor.
    Delegation {
        actor: ActorSource,
        /// Refuse unless the subject's `may_act` names the actor (RFC 8693 §4.4).
        require_may_act: bool,
    },
    /// The gateway's own token for the route; the caller's token is checked, never sent.
    ClientCredentials { caller: CallerPolicy },
    /// Steps in order, each an impersonation whose subject is the previous step's result
    /// (the caller's token for the first).
    Chain { steps: Vec<Arc<ExchangeProfile>> },
    /// A Transaction Token per request, with these request attributes as its context.
    TransactionToken { context: Vec<ContextAttribute> },
}

impl Mode {
    /// The actor of a delegation; `None` for the other modes.
    pub fn actor(&self) -> Option<&ActorSource> {
        match self {
            Mode::Delegation { actor, .. } => Some(actor),
            _ => None,
        }
    }
}

/// Where a delegation's actor token comes from, live.
#[derive(Debug)]
pub enum ActorSource {
    /// The gateway's own token: client credentials per this profile, cached like any token.
    Own(Arc<ExchangeProfile>),
    /// A file a platform keeps current, re-read in the background when it changes.
    File(Arc<TokenFile>),
}

impl ExchangeProfile {
    /// The live profile for `settings` at `path` (the route's `exchange` key): its token
    /// service from `services`, and for a delegation its actor (a token file is read now).
    pub fn build(
        path: &str,
        settings: &Arc<ExchangeSettings>,
        services: &TokenServices,
    ) -> Result<ExchangeProfile, ConfigProblem> {
        let service = services
            .get(&settings.service.name)
            .cloned()
            .ok_or_else(|| {
                ConfigProblem::new(
                    format!("{path}.token_service"),
                    format!("unknown token service \"{}\"", settings.service.name),
                )
            })?;
        let mode =
            match &settings.mode {
                ModeSettings::Impersonation => Mode::Impersonation,
                ModeSettings::ClientCredentials { caller } => {
                    Mode::ClientCredentials { caller: *caller }
                }
                ModeSettings::Delegation {
                    actor,
                    require_may_act,
                } => Mode::Delegation {
                    actor: match actor {
                        ActorSettings::File(file) => {
                            ActorSource::File(Arc::new(TokenFile::open(file).map_err(|m| {
                                ConfigProblem::new(format!("{path}.actor.token_file"), m)
                            })?))
                        }
                        ActorSettings::Own(own) => ActorSource::Own(Arc::new(
                            ExchangeProfile::build(&format!("{path}.actor"), own, services)?,
                        )),
                    },
                    require_may_act: *require_may_act,
                },
                ModeSettings::Chain { steps } => Mode::Chain {
                    steps: steps
                        .iter()
                        .enumerate()
                        .map(|(i, step)| {
                            ExchangeProfile::build(&format!("{path}.chain[{i}]"), step, services)
                                .map(Arc::new)
                        })
                        .collect::<Result<_, _>>()?,
                },
                ModeSettings::TransactionToken { context } => Mode::TransactionToken {
                    context: context.clone(),
                },
            };
        Ok(ExchangeProfile {
            settings: settings.clone(),
            mode,
            service,
        })
    }
}
