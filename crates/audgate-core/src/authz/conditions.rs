//! `required_claims`: conditions on claims beyond client id, scopes and roles, as Istio's
//! `when: request.auth.claims[...]` and Authorino's patterns express them.
//!
//! A condition names a claim by a dotted path and what it must hold:
//! - a scalar (string, number, boolean): the claim equals it, compared as JSON (`true` is not
//!   `"true"`, `1` equals `1.0`); an array claim holds when one of its items equals it;
//! - a list of scalars: the claim (a scalar, or an array of them) holds at least one of them;
//! - a string with a leading or trailing `*` matches a suffix or a prefix, `*` alone any
//!   present value (Istio's rules); a `*` anywhere else is refused at load.
//!
//! A dotted path reaches nested claims (`realm_access.roles`). A claim whose own name holds a
//! dot (`https://example.com/roles`, as Auth0 and many mappers name them) is found too: at each
//! level the longest run of segments that is a key of that object wins, so the literal name
//! is tried before the nested reading.

use serde_json::{Map, Value};

use super::jwt::printable;
use super::reason::{Denial, Reason};

/// At most this many dot-separated segments in a claim path (bounds the lookup's search).
pub const MAX_PATH_SEGMENTS: usize = 16;
/// At most this many values in a one-of list.
pub const MAX_ALTERNATIVES: usize = 256;

/// One value a claim may hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Pattern {
    /// A JSON scalar (string, number, boolean), compared as JSON.
    Exact(Value),
    /// `abc*`
    Prefix(String),
    /// `*abc`
    Suffix(String),
    /// `*`: any value that is present (and not null).
    Present,
}

impl Pattern {
    fn parse(v: &Value) -> Result<Pattern, String> {
        match v {
            Value::String(s) if s == "*" => Ok(Pattern::Present),
            Value::String(s) => {
                let inner = s.trim_start_matches('*').trim_end_matches('*');
                let stars = s.matches('*').count();
                if stars == 0 {
                    Ok(Pattern::Exact(v.clone()))
                } else if stars == 1 && s.starts_with('*') {
                    Ok(Pattern::Suffix(inner.to_owned()))
                } else if stars == 1 && s.ends_with('*') {
                    Ok(Pattern::Prefix(inner.to_owned()))
                } else {
                    Err(format!(
                        "`{s}`: `*` may only be the first or the last character (a suffix or a prefix match), or the whole value"
                    ))
                }
            }
            Value::Number(_) | Value::Bool(_) => Ok(Pattern::Exact(v.clone())),
            Value::Null => Err("null is not a value a claim can be required to hold".to_owned()),
            Value::Array(_) => Err("a list inside a list: use one flat list of values".to_owned()),
            Value::Object(_) => Err("a mapping is not a claim value: use a dotted path for nested claims".to_owned()),
        }
    }

    /// Whether a single (non-array) claim value matches.
    fn matches_scalar(&self, v: &Value) -> bool {
        match (self, v) {
            (Pattern::Present, Value::Null) => false,
            (Pattern::Present, _) => true,
            (Pattern::Prefix(p), Value::String(s)) => s.starts_with(p.as_str()),
            (Pattern::Suffix(p), Value::String(s)) => s.ends_with(p.as_str()),
            (Pattern::Exact(Value::Number(a)), Value::Number(b)) => {
                a == b || matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
            }
            (Pattern::Exact(want), got) => want == got,
            _ => false,
        }
    }

    /// Whether the claim matches: a scalar directly, an array when one item does.
    fn matches(&self, v: &Value) -> bool {
        match v {
            Value::Array(items) => items.iter().any(|item| self.matches_scalar(item)),
            other => self.matches_scalar(other),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Exact(Value::String(s)) => write!(f, "\"{}\"", printable(s)),
            Pattern::Exact(v) => write!(f, "{v}"),
            Pattern::Prefix(p) => write!(f, "\"{}*\"", printable(p)),
            Pattern::Suffix(p) => write!(f, "\"*{}\"", printable(p)),
            Pattern::Present => f.write_str("\"*\""),
        }
    }
}

/// One `required_claims` entry, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimCondition {
    /// The claim path as written in the config.
    pub claim: String,
    path: Vec<String>,
    /// One of these must match; a scalar in the config is a list of one.
    pub any_of: Vec<Pattern>,
    /// Written as a list (for messages: "one of [...]" rather than "equal to ...").
    list: bool,
}

impl ClaimCondition {
    /// Compile one entry (`claim: value`); the error says what is wrong with it.
    pub fn parse(claim: &str, value: &Value) -> Result<ClaimCondition, String> {
        let path: Vec<String> = claim.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!(
                "`{claim}` is not a claim path (names separated by single dots, like realm_access.roles)"
            ));
        }
        if path.len() > MAX_PATH_SEGMENTS {
            return Err(format!("`{claim}` has more than {MAX_PATH_SEGMENTS} segments"));
        }
        let (any_of, list) = match value {
            Value::Array(items) => {
                if items.is_empty() {
                    return Err(format!("{claim}: the list of accepted values is empty"));
                }
                if items.len() > MAX_ALTERNATIVES {
                    return Err(format!("{claim}: more than {MAX_ALTERNATIVES} accepted values"));
                }
                let patterns = items
                    .iter()
                    .map(Pattern::parse)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("{claim}: {e}"))?;
                (patterns, true)
            }
            scalar => (
                vec![Pattern::parse(scalar).map_err(|e| format!("{claim}: {e}"))?],
                false,
            ),
        };
        Ok(ClaimCondition {
            claim: claim.to_owned(),
            path,
            any_of,
            list,
        })
    }

    /// What the condition requires, for messages: `equal to true`, `one of ["a", "b"]`.
    pub fn requirement(&self) -> String {
        match (&self.any_of[..], self.list) {
            ([Pattern::Present], false) => "present".to_owned(),
            ([Pattern::Prefix(_) | Pattern::Suffix(_)], false) => format!("matching {}", self.any_of[0]),
            ([one], false) => format!("equal to {one}"),
            (many, _) => {
                let items: Vec<String> = many.iter().map(ToString::to_string).collect();
                format!("one of [{}]", items.join(", "))
            }
        }
    }

    /// The claim's value in `payload`, if present.
    pub fn lookup<'a>(&self, payload: &'a Map<String, Value>) -> Option<&'a Value> {
        lookup(payload, &self.path)
    }

    /// Whether the condition holds for `payload`.
    pub fn holds(&self, payload: &Map<String, Value>) -> bool {
        self.lookup(payload)
            .is_some_and(|v| self.any_of.iter().any(|p| p.matches(v)))
    }

    /// The denial for a payload it does not hold for.
    pub fn denial(&self, route: &str, payload: &Map<String, Value>) -> Denial {
        Denial::new(
            Reason::ClaimMismatch,
            format!(
                "route {route} needs claim {} {}; the token has {}",
                self.claim,
                self.requirement(),
                shown(self.lookup(payload))
            ),
        )
    }
}

/// Resolve a dotted path; at each level the longest run of segments that names a key wins, so
/// a claim literally named `a.b` is found before `a` -> `b`.
pub fn lookup<'a, S: AsRef<str>>(payload: &'a Map<String, Value>, path: &[S]) -> Option<&'a Value> {
    for take in (1..=path.len()).rev() {
        let key = if take == 1 {
            std::borrow::Cow::Borrowed(path[0].as_ref())
        } else {
            std::borrow::Cow::Owned(path[..take].iter().map(AsRef::as_ref).collect::<Vec<_>>().join("."))
        };
        let Some(node) = payload.get(key.as_ref()) else {
            continue;
        };
        let rest = &path[take..];
        if rest.is_empty() {
            return Some(node);
        }
        if let Some(found) = node.as_object().and_then(|obj| lookup(obj, rest)) {
            return Some(found);
        }
    }
    None
}

/// A claim's value for a description, printed safely and briefly: strings quoted with control
/// characters escaped, at most 8 array items, at most 64 characters a string.
pub fn shown(v: Option<&Value>) -> String {
    fn one(v: &Value) -> String {
        match v {
            Value::String(s) => {
                let cut: String = s.chars().take(64).collect();
                let more = if cut.len() < s.len() { "..." } else { "" };
                format!("\"{}{more}\"", printable(&cut))
            }
            Value::Array(_) => "[...]".to_owned(),
            Value::Object(_) => "{...}".to_owned(),
            other => other.to_string(),
        }
    }
    match v {
        None | Some(Value::Null) => "(absent)".to_owned(),
        Some(Value::Array(items)) => {
            let mut parts: Vec<String> = items.iter().take(8).map(one).collect();
            if items.len() > 8 {
                parts.push(format!("... {} more", items.len() - 8));
            }
            format!("[{}]", parts.join(", "))
        }
        Some(other) => one(other),
    }
}

/// Check every condition in order; the first that does not hold is the denial.
pub fn check(route: &str, conditions: &[ClaimCondition], payload: &Map<String, Value>) -> Result<(), Denial> {
    match conditions.iter().find(|c| !c.holds(payload)) {
        None => Ok(()),
        Some(failed) => Err(failed.denial(route, payload)),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cond(claim: &str, v: Value) -> ClaimCondition {
        ClaimCondition::parse(claim, &v).unwrap()
    }

    fn payload(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn scalars_compare_as_json() {
        let p = payload(json!({"email_verified": true, "level": 3, "s": "true", "f": 3.0, "name": "acme"}));
        assert!(cond("email_verified", json!(true)).holds(&p));
        assert!(!cond("email_verified", json!(false)).holds(&p));
        assert!(
            !cond("s", json!(true)).holds(&p),
            "the string \"true\" is not the boolean"
        );
        assert!(cond("s", json!("true")).holds(&p));
        assert!(cond("level", json!(3)).holds(&p));
        assert!(cond("f", json!(3)).holds(&p), "3 equals 3.0");
        assert!(!cond("level", json!("3")).holds(&p));
        assert!(cond("name", json!("acme")).holds(&p));
        assert!(!cond("name", json!("Acme")).holds(&p), "case matters");
        assert!(!cond("absent", json!("x")).holds(&p));
    }

    #[test]
    fn lists_accept_one_of_over_strings_and_arrays() {
        let p = payload(json!({"groups": ["dev", "ops"], "team": "ops", "empty": []}));
        assert!(cond("groups", json!(["admins", "ops"])).holds(&p));
        assert!(!cond("groups", json!(["admins", "qa"])).holds(&p));
        assert!(cond("team", json!(["admins", "ops"])).holds(&p));
        assert!(!cond("empty", json!(["admins"])).holds(&p));
        // a scalar requirement against an array claim: one item equals it (Istio's reading)
        assert!(cond("groups", json!("dev")).holds(&p));
    }

    #[test]
    fn wildcards_match_prefix_suffix_and_presence() {
        let p = payload(json!({"tenant_id": "acme-eu", "mail": "a@example.com", "groups": ["x", "team-a"], "n": null}));
        assert!(cond("tenant_id", json!("acme-*")).holds(&p));
        assert!(!cond("tenant_id", json!("corp-*")).holds(&p));
        assert!(cond("mail", json!("*@example.com")).holds(&p));
        assert!(!cond("mail", json!("*@evil.com")).holds(&p));
        assert!(cond("groups", json!(["team-*"])).holds(&p));
        assert!(cond("mail", json!("*")).holds(&p));
        assert!(!cond("missing", json!("*")).holds(&p));
        assert!(!cond("n", json!("*")).holds(&p), "null is absent");
        // a prefix never matches a non-string
        let q = payload(json!({"tenant_id": 42}));
        assert!(!cond("tenant_id", json!("4*")).holds(&q));
    }

    #[test]
    fn dotted_paths_reach_nested_claims_and_literal_dotted_names() {
        let p = payload(json!({
            "realm_access": {"roles": ["user", "admin"]},
            "https://example.com/roles": ["buyer"],
            "a.b": "literal",
            "a": {"b": "nested"},
            "x": {"y.z": {"w": 1}}
        }));
        assert!(cond("realm_access.roles", json!(["admin"])).holds(&p));
        assert!(cond("https://example.com/roles", json!("buyer")).holds(&p));
        assert!(cond("a.b", json!("literal")).holds(&p), "the literal name wins");
        assert!(!cond("a.b", json!("nested")).holds(&p));
        assert!(cond("x.y.z.w", json!(1)).holds(&p), "a dotted key inside an object");
        assert!(!cond("realm_access.roles.admin", json!("*")).holds(&p));
        // the nested reading is still found when the literal one leads nowhere
        let q = payload(json!({"a.b": {"c": 1}, "a": {"b": {"d": 2}}}));
        assert!(cond("a.b.d", json!(2)).holds(&q));
    }

    #[test]
    fn malformed_entries_are_refused_with_a_reason() {
        for (claim, v, why) in [
            ("a..b", json!("x"), "not a claim path"),
            ("", json!("x"), "not a claim path"),
            ("groups", json!([]), "empty"),
            ("groups", json!([["a"]]), "a list inside a list"),
            ("groups", json!({"a": 1}), "a mapping"),
            ("groups", json!(null), "null"),
            ("groups", json!("a*b"), "first or the last"),
            ("groups", json!("*a*"), "first or the last"),
            ("groups", json!([1, "x*y"]), "first or the last"),
        ] {
            let e = ClaimCondition::parse(claim, &v).unwrap_err();
            assert!(e.contains(why), "{claim} {v}: {e}");
        }
        let deep = vec!["a"; MAX_PATH_SEGMENTS + 1].join(".");
        assert!(ClaimCondition::parse(&deep, &json!(1)).is_err());
    }

    #[test]
    fn a_denial_names_the_claim_the_requirement_and_what_the_token_had() {
        let p = payload(json!({"groups": ["dev", "qa\u{7}"], "email_verified": false}));
        let conditions = vec![
            cond("email_verified", json!(false)),
            cond("groups", json!(["admins", "ops"])),
        ];
        let d = check("orders", &conditions, &p).unwrap_err();
        assert_eq!(d.reason, Reason::ClaimMismatch);
        assert_eq!(
            d.description,
            r#"route orders needs claim groups one of ["admins", "ops"]; the token has ["dev", "qa?"]"#
        );
        let d = check("r", &[cond("email_verified", json!(true))], &payload(json!({}))).unwrap_err();
        assert_eq!(
            d.description,
            "route r needs claim email_verified equal to true; the token has (absent)"
        );
        let d = check(
            "r",
            &[cond("t", json!("acme-*"))],
            &payload(json!({"t": "x".repeat(100)})),
        )
        .unwrap_err();
        assert!(
            d.description
                .ends_with(&format!("matching \"acme-*\"; the token has \"{}...\"", "x".repeat(64)))
        );
        assert!(check("r", &conditions[..1], &p).is_ok());
    }
}
