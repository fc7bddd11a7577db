//! The closed set of reason codes (SPEC.md "Decisions") and a denial with its description.

use std::fmt;

/// Why a request was allowed, denied or could not be decided. Closed on purpose: every value
/// is a metric label, a log field and part of the response body, so it never carries data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Allowed,
    Anonymous,
    /// A CORS preflight on a route with `allow_cors_preflight`.
    CorsPreflight,
    MissingToken,
    MalformedToken,
    WrongTokenType,
    UnsupportedAlg,
    UnknownIssuer,
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    AudienceMismatch,
    InsufficientScope,
    /// A `required_claims` entry does not hold.
    ClaimMismatch,
    NoRoute,
    KeysUnavailable,
}

impl Reason {
    /// Every reason, in the order of SPEC.md's table.
    pub const ALL: [Reason; 17] = [
        Reason::Allowed,
        Reason::Anonymous,
        Reason::CorsPreflight,
        Reason::MissingToken,
        Reason::MalformedToken,
        Reason::WrongTokenType,
        Reason::UnsupportedAlg,
        Reason::UnknownIssuer,
        Reason::UnknownKid,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::AudienceMismatch,
        Reason::InsufficientScope,
        Reason::ClaimMismatch,
        Reason::NoRoute,
        Reason::KeysUnavailable,
    ];

    /// The wire name: response body `error`, metric label, log field.
    pub const fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::Anonymous => "anonymous",
            Reason::CorsPreflight => "cors_preflight",
            Reason::MissingToken => "missing_token",
            Reason::MalformedToken => "malformed_token",
            Reason::WrongTokenType => "wrong_token_type",
            Reason::UnsupportedAlg => "unsupported_alg",
            Reason::UnknownIssuer => "unknown_issuer",
            Reason::UnknownKid => "unknown_kid",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::AudienceMismatch => "audience_mismatch",
            Reason::InsufficientScope => "insufficient_scope",
            Reason::ClaimMismatch => "claim_mismatch",
            Reason::NoRoute => "no_route",
            Reason::KeysUnavailable => "keys_unavailable",
        }
    }

    /// The HTTP status Envoy (or the HTTP endpoint) answers with.
    pub const fn http_status(self) -> u16 {
        match self {
            Reason::Allowed | Reason::Anonymous | Reason::CorsPreflight => 200,
            Reason::AudienceMismatch | Reason::InsufficientScope | Reason::ClaimMismatch | Reason::NoRoute => 403,
            Reason::KeysUnavailable => 503,
            _ => 401,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A negative answer: the reason and a sentence a person can act on. The description names
/// claims and expected values; it never contains the token or a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    pub description: String,
}

impl Denial {
    pub fn new(reason: Reason, description: impl Into<String>) -> Self {
        Denial {
            reason,
            description: description.into(),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.description)
    }
}
