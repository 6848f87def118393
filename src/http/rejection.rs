//! [`Rejection`]: every way the gateway refuses a request, with its status,
//! its outcome label and its public message. Phases and endpoints return
//! one; `gateway/rescue.rs` renders it once, as JSON, an HTML page or a
//! redirect, depending on who asked. Details for operators go to the log
//! where the refusal is decided, never into the answer.

use std::borrow::Cow;
use std::time::Duration;

use http::StatusCode;

use crate::policy::PathError;
use crate::telemetry::Outcome;

/// A refusal, in terms a client may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The request target is longer than `listen.max_uri_bytes`.
    UriTooLong,
    /// `CONNECT` (the gateway is not a forward proxy).
    ConnectMethod,
    /// A method that is not upper-case letters, `-` and `_` (`delete`).
    BadMethod,
    /// The path cannot be normalised without ambiguity.
    BadPath(PathError),
    /// Several or malformed `Host` values.
    BadHost,
    /// More than one different primary credential.
    AmbiguousCredentials,
    /// A method override header would move the request to another rule.
    MethodOverride,
    /// The normalised target cannot be turned into an upstream URI.
    BadTarget,
    /// A `deny` rule.
    Denied,
    /// No valid primary identity where one is needed.
    Unauthenticated,
    /// An identity without a fresh second factor on a step-up route.
    /// `acr_values` (space-separated) are the identity provider's levels
    /// that would satisfy it (RFC 9470); `codes` says whether a code from
    /// the gateway can (false: only a new sign-in at the identity provider
    /// can); `stash` names a browser form post kept across the challenge.
    StepUpRequired {
        max_age: u64,
        acr_values: Option<String>,
        codes: bool,
        stash: Option<String>,
    },
    /// Forward-auth headers from a peer that is not a trusted proxy.
    UntrustedPeer,
    /// Forward-auth without (usable) headers naming the original request.
    MissingOriginal(&'static str),
    /// A malformed body or field (the message says which).
    BadRequest(&'static str),
    /// A required JSON field is missing, or is not a string.
    BadField {
        name: &'static str,
        missing: bool,
    },
    UnsupportedMediaType,
    MethodNotAllowed,
    NotFound,
    /// A delivery channel this user or config does not offer.
    UnknownChannel,
    /// A code with the wrong shape (length, non-digits).
    CodeFormat,
    /// A wrong code.
    InvalidCode {
        attempts_left: u32,
    },
    /// The challenge expired, was spent, or is dead.
    ChallengeGone,
    /// Asked for a code again too soon.
    Cooldown(Duration),
    /// Over the hourly send budget.
    SendLimit(Duration),
    /// `max_sends_per_client` reached for this client address.
    ClientLimit(Duration),
    /// The channel's hourly budget is spent.
    BudgetExhausted(Duration),
    /// SMS to a number outside `stepup.sms.allowed_countries`.
    DestinationNotAllowed,
    /// Locked out after too many wrong codes.
    Locked(Duration),
    /// The code could not be delivered.
    DeliveryFailed,
    /// The store could not be asked: fail closed.
    StepupUnavailable,
    /// The identity provider's keys have not arrived yet: a token could
    /// not be checked, so fail closed.
    IdentityUnavailable,
    UpstreamTimeout,
    UpstreamUnavailable,
    /// A bug (a panic): nothing was forwarded.
    Internal,
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        use Rejection::*;
        match self {
            UriTooLong => StatusCode::URI_TOO_LONG,
            ConnectMethod | MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            BadPath(_)
            | BadMethod
            | BadHost
            | AmbiguousCredentials
            | MethodOverride
            | BadTarget
            | MissingOriginal(_)
            | BadRequest(_)
            | BadField { .. } => StatusCode::BAD_REQUEST,
            Denied | UntrustedPeer | DestinationNotAllowed => StatusCode::FORBIDDEN,
            Unauthenticated | StepUpRequired { .. } | InvalidCode { .. } => {
                StatusCode::UNAUTHORIZED
            }
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            NotFound => StatusCode::NOT_FOUND,
            UnknownChannel | CodeFormat => StatusCode::UNPROCESSABLE_ENTITY,
            ChallengeGone => StatusCode::GONE,
            Cooldown(_) | SendLimit(_) | ClientLimit(_) | BudgetExhausted(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Locked(_) => StatusCode::LOCKED,
            DeliveryFailed | UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            StepupUnavailable | IdentityUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The outcome label of metrics and the access log.
    pub fn outcome(&self) -> Outcome {
        use Rejection::*;
        match self {
            Denied | UntrustedPeer => Outcome::Denied,
            Unauthenticated => Outcome::Unauthenticated,
            StepUpRequired { .. } => Outcome::Challenged,
            StepupUnavailable => Outcome::StoreUnavailable,
            IdentityUnavailable => Outcome::IdentityUnavailable,
            UpstreamTimeout | UpstreamUnavailable => Outcome::UpstreamError,
            DeliveryFailed | Internal => Outcome::Gateway,
            _ => Outcome::BadRequest,
        }
    }

    /// The machine-readable `error` of the JSON body.
    pub fn code(&self) -> &'static str {
        use Rejection::*;
        match self {
            UriTooLong => "uri_too_long",
            ConnectMethod | MethodNotAllowed => "method_not_allowed",
            BadPath(_) => "bad_path",
            BadMethod => "bad_method",
            BadHost => "bad_host",
            AmbiguousCredentials => "ambiguous_credentials",
            MethodOverride => "method_override",
            BadTarget | BadRequest(_) | BadField { .. } | MissingOriginal(_) => "bad_request",
            Denied | UntrustedPeer => "forbidden",
            Unauthenticated => "unauthenticated",
            StepUpRequired { .. } => "insufficient_user_authentication",
            UnsupportedMediaType => "unsupported_media_type",
            NotFound => "not_found",
            UnknownChannel => "unknown_method",
            CodeFormat => "invalid_code_format",
            InvalidCode { .. } => "invalid_code",
            ChallengeGone => "challenge_gone",
            Cooldown(_) => "too_soon",
            SendLimit(_) => "too_many_codes",
            ClientLimit(_) => "too_many_codes_from_client",
            BudgetExhausted(_) => "send_budget_exhausted",
            DestinationNotAllowed => "destination_not_allowed",
            Locked(_) => "locked",
            DeliveryFailed => "delivery_failed",
            StepupUnavailable => "stepup_unavailable",
            IdentityUnavailable => "identity_unavailable",
            UpstreamTimeout => "upstream_timeout",
            UpstreamUnavailable => "upstream_unavailable",
            Internal => "internal_error",
        }
    }

    /// The short public message: says what to do, reveals nothing.
    pub fn message(&self) -> Cow<'static, str> {
        use Rejection::*;
        Cow::Borrowed(match self {
            UriTooLong => "request target too long",
            ConnectMethod => "CONNECT is not supported",
            BadMethod => "the method must be upper case",
            BadPath(e) => return Cow::Owned(e.to_string()),
            BadHost => "invalid Host",
            AmbiguousCredentials => "send one primary credential",
            MethodOverride => "method override would change the route",
            BadTarget => "request target cannot be forwarded",
            Denied => "this route is not available",
            UntrustedPeer => "forward-auth is only answered to trusted proxies",
            MissingOriginal(m) | BadRequest(m) => m,
            BadField { name, missing } => {
                return Cow::Owned(if *missing {
                    format!("{name} is required")
                } else {
                    format!("{name} must be a string")
                })
            }
            Unauthenticated => "sign in first",
            StepUpRequired { .. } => "a fresh second factor is required",
            UnsupportedMediaType => "send application/json",
            MethodNotAllowed => "method not allowed",
            NotFound => "no such endpoint",
            UnknownChannel => "that method is not available",
            CodeFormat => "the code has the wrong format",
            InvalidCode { .. } => "the code is not right",
            ChallengeGone => "this code has expired or was used; ask for a new one",
            Cooldown(_) => "wait before asking for another code",
            SendLimit(_) => "too many codes requested; try later",
            ClientLimit(_) => "too many codes requested from this address; try later",
            BudgetExhausted(_) => {
                "no more codes can be sent on this channel for now; try later or another method"
            }
            DestinationNotAllowed => {
                "codes cannot be sent to this phone number; use another method"
            }
            Locked(_) => "too many wrong codes; try later",
            DeliveryFailed => "the code could not be sent; try again",
            StepupUnavailable => "step-up is temporarily unavailable",
            IdentityUnavailable => "sign-in cannot be checked right now; try again shortly",
            UpstreamTimeout => "the upstream did not answer in time",
            UpstreamUnavailable => "the upstream is unavailable",
            Internal => "internal error",
        })
    }

    /// Whole seconds to wait, rounded up, for 423/429 answers.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Rejection::Cooldown(d)
            | Rejection::SendLimit(d)
            | Rejection::ClientLimit(d)
            | Rejection::BudgetExhausted(d)
            | Rejection::Locked(d) => Some(d.as_secs() + u64::from(d.subsec_nanos() > 0)),
            Rejection::IdentityUnavailable => Some(5),
            _ => None,
        }
    }
}

impl From<super::BodyError> for Rejection {
    fn from(e: super::BodyError) -> Rejection {
        match e {
            super::BodyError::TooLarge(_) => Rejection::BadRequest("body too large"),
            super::BodyError::Unreadable => Rejection::BadRequest("body unreadable"),
        }
    }
}
