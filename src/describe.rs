//! What `txgate check` prints about a valid configuration: the one-line summary, and with
//! `--verbose` each token service's endpoints and each route's exact STS request.
//!
//! Kept apart from loading because it is output for people, not configuration: it reads a
//! loaded [`Config`] and nothing here decides how the gateway behaves.

use crate::config::{ActorSettings, Config, Exchange, ExchangeSettings, ModeSettings};
use crate::exchange::{describe_request, describe_step};

/// `txgate check --verbose`: the summary, then each token service's endpoints and each route's
/// exact STS request (tokens as placeholders, secrets redacted).
pub fn verbose(config: &Config) -> String {
    let mut out = summary(config);
    for (name, service) in &config.token_services {
        out.push_str(&format!(
            "\n  token_services.{name}: profile {}, token endpoint {}, client {} ({:?})",
            service.profile.as_str(),
            service.token_endpoint,
            service.client_id,
            service.client_auth
        ));
        if let Some(jwks) = &service.jwks_uri {
            out.push_str(&format!(", jwks {jwks}"));
        }
        if let Some(inbound) = &service.inbound {
            out.push_str(&format!(", inbound validation {inbound:?}"));
        }
    }
    for (i, route) in config.routes.iter().enumerate() {
        let what = match &route.exchange {
            Exchange::None => "mode none: no token upstream".to_string(),
            Exchange::Token(p) => exchange(p),
            Exchange::ByIssuer(choices) => {
                let mut line = format!(
                    "mode {}, token service chosen by the caller's iss:",
                    choices[0].exchange.mode.as_str()
                );
                for choice in choices.iter() {
                    line.push_str(&format!(
                        "\n      iss {} -> {}",
                        choice.issuer,
                        exchange(&choice.exchange)
                    ));
                }
                line
            }
        };
        out.push_str(&format!(
            "\n  routes[{i}] {} {} -> {}: {what}",
            route.name, route.path_prefix, route.upstream.display
        ));
    }
    out
}

/// One exchange: its mode, token service and exact request; a chain's steps each on a line
/// of their own, each subject the previous step's result.
fn exchange(p: &ExchangeSettings) -> String {
    match &p.mode {
        ModeSettings::Chain { steps } => {
            let mut line = format!("mode chain of {} steps:", steps.len());
            for (i, step) in steps.iter().enumerate() {
                let subject = match i {
                    0 => "CALLER_TOKEN".to_string(),
                    n => format!("RESULT_OF_STEP_{n}"),
                };
                line.push_str(&format!(
                    "\n      step {} at {}: {}",
                    i + 1,
                    step.service.name,
                    describe_step(step, &subject)
                ));
            }
            line
        }
        ModeSettings::TransactionToken { context } => {
            let keys: Vec<&str> = context.iter().map(|c| c.key()).collect();
            format!(
                "mode transaction_token at {}: {} (REQUEST_CONTEXT: base64url JSON of {}; \
                 the result goes upstream as Txn-Token, obtained for each request, never cached)",
                p.service.name,
                describe_request(p),
                if keys.is_empty() {
                    "nothing".to_string()
                } else {
                    keys.join(", ")
                }
            )
        }
        _ => {
            let mut line = format!(
                "mode {} at {}: {}",
                p.mode.as_str(),
                p.service.name,
                describe_request(p)
            );
            if let Some(ActorSettings::Own(own)) = p.mode.actor() {
                line.push_str(&format!("; actor token: {}", describe_request(own)));
            }
            line
        }
    }
}

/// A one-line summary for `txgate check`.
pub fn summary(config: &Config) -> String {
    let listen: Vec<String> = config.server.listen.iter().map(|a| a.to_string()).collect();
    let admin = match config.server.admin_listen {
        Some(a) => format!(", admin on {a}"),
        None => String::new(),
    };
    let ext_authz: String = [
        ("ext_authz grpc", config.server.ext_authz.grpc_listen),
        ("ext_authz http", config.server.ext_authz.http_listen),
    ]
    .into_iter()
    .filter_map(|(what, addr)| addr.map(|a| format!(", {what} on {a}")))
    .collect();
    let listening = if listen.is_empty() && config.server.tls.is_none() {
        "no proxy listener".to_string()
    } else {
        format!("listening on {}", listen.join(", "))
    };
    format!(
        "{}: ok: {} route{}, {} token service{}, {}{}{}",
        config.source,
        config.routes.len(),
        plural(config.routes.len()),
        config.token_services.len(),
        plural(config.token_services.len()),
        listening,
        admin,
        ext_authz,
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}
