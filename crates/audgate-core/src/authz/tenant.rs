//! Templated issuers: one issuer entry for many tenants (Keycloak realms, ...). The issuer
//! `https://sso.example.com/realms/{tenant}` accepts the `iss` values it produces for the
//! listed `tenants`, or for any tenant matching `tenant_pattern`. `{tenant}` stands for exactly
//! one whole path segment, so a tenant never holds a `/`.

use regex::Regex;

/// The placeholder in `issuer`, `issuer_aliases`, `discovery_url`, `jwks_uri` and `jwks_file`.
pub const PLACEHOLDER: &str = "{tenant}";

/// Which tenants a templated issuer accepts.
#[derive(Debug, Clone)]
pub enum TenantSet {
    /// `tenants: [...]`: these, and their keys load at start like an issuer's.
    Listed(Vec<String>),
    /// `tenant_pattern`: any tenant the regex matches as a whole; keys load on first use, at
    /// most `max` tenants at once.
    Pattern {
        regex: Regex,
        /// As written in the config (what `check-config` shows).
        pattern: String,
        max: usize,
    },
}

impl TenantSet {
    /// `tenant_pattern` (compiled to match the whole tenant) with `max_tenants`.
    pub fn pattern(pattern: &str, max: usize) -> Result<TenantSet, String> {
        Ok(TenantSet::Pattern {
            regex: compile_pattern(pattern)?,
            pattern: pattern.to_owned(),
            max,
        })
    }

    pub fn accepts(&self, tenant: &str) -> bool {
        match self {
            TenantSet::Listed(list) => list.iter().any(|t| t == tenant),
            TenantSet::Pattern { regex, .. } => regex.is_match(tenant),
        }
    }
}

/// A compiled `{tenant}` template of an issuer (with its aliases).
#[derive(Debug, Clone)]
pub struct TenantTemplate {
    /// `(before, after)` the placeholder, for the issuer and then each alias.
    shapes: Vec<(String, String)>,
    pub tenants: TenantSet,
}

impl TenantTemplate {
    /// `templates` are the issuer and its aliases, each already checked by [`check_template`].
    pub fn new<'a>(templates: impl IntoIterator<Item = &'a str>, tenants: TenantSet) -> TenantTemplate {
        let shapes = templates
            .into_iter()
            .filter_map(|t| t.split_once(PLACEHOLDER))
            .map(|(before, after)| (before.to_owned(), after.to_owned()))
            .collect();
        TenantTemplate { shapes, tenants }
    }

    /// The tenant `iss` names, when it has this template's shape and the tenant is accepted.
    pub fn tenant_of<'i>(&self, iss: &'i str) -> Option<&'i str> {
        self.shapes.iter().find_map(|(before, after)| {
            let rest = iss.strip_prefix(before.as_str())?;
            let tenant = rest.strip_suffix(after.as_str())?;
            // one plain segment: a `%`-escape or a dot segment could point the key fetch at
            // another path of the host (`%2e%2e` is `..` to a URL parser)
            (check_tenant_name(tenant).is_ok() && self.tenants.accepts(tenant)).then_some(tenant)
        })
    }
}

/// `{tenant}` replaced by `tenant` (a URL or a file path of a templated issuer).
pub fn fill(template: &str, tenant: &str) -> String {
    template.replace(PLACEHOLDER, tenant)
}

/// Whether `value` holds `{tenant}` exactly once, as one whole path segment of a URL
/// (`https://host/realms/{tenant}`, `.../{tenant}/protocol/...`); the reason when not.
pub fn check_template(value: &str) -> Result<(), String> {
    let count = value.matches(PLACEHOLDER).count();
    if count != 1 {
        return Err(format!("`{value}` must hold `{{tenant}}` exactly once (found {count})"));
    }
    let Some((_, after_scheme)) = value.split_once("://") else {
        return Err(format!("`{value}` is not an http(s) URL"));
    };
    let Some(slash) = after_scheme.find('/') else {
        return Err(format!(
            "`{value}`: `{{tenant}}` must be a path segment, not in the host"
        ));
    };
    let (host, path) = after_scheme.split_at(slash);
    if host.contains(PLACEHOLDER) {
        return Err(format!(
            "`{value}`: `{{tenant}}` must be a path segment, not in the host"
        ));
    }
    if path.contains(['?', '#']) {
        return Err(format!("`{value}`: a templated URL takes no query or fragment"));
    }
    if !path.split('/').any(|segment| segment == PLACEHOLDER) {
        return Err(format!(
            "`{value}`: `{{tenant}}` must be one whole path segment (like /realms/{{tenant}})"
        ));
    }
    Ok(())
}

/// Whether a listed tenant (or one a route names) can be a path segment.
pub fn check_tenant_name(tenant: &str) -> Result<(), String> {
    let ok = !tenant.is_empty()
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b))
        && tenant != "."
        && tenant != "..";
    if ok {
        Ok(())
    } else {
        Err(format!("`{tenant}` is not a tenant name (one URL path segment)"))
    }
}

/// Compile a `tenant_pattern`. It matches the whole tenant, as `path_regex` matches the whole
/// path (and Envoy's `safe_regex` its whole input): `[a-z]+` accepts `shop`, never `shop!x`.
/// A pattern already written with `^...$` means the same.
fn compile_pattern(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        let first = e.to_string().lines().last().unwrap_or_default().trim().to_owned();
        format!("tenant_pattern `{pattern}` does not compile: {first}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(t: &[&str]) -> TenantSet {
        TenantSet::Listed(t.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn templates_are_one_whole_path_segment() {
        assert!(check_template("https://sso.example.com/realms/{tenant}").is_ok());
        assert!(check_template("https://sso.example.com/realms/{tenant}/protocol/openid-connect/certs").is_ok());
        for bad in [
            "https://sso.example.com/realms/x{tenant}",
            "https://sso.example.com/realms/{tenant}-eu",
            "https://{tenant}.example.com/realms/a",
            "https://sso.example.com/{tenant}/{tenant}",
            "https://sso.example.com/realms/shop",
            "https://sso.example.com/realms/{tenant}?x=1",
            "sso/{tenant}",
        ] {
            assert!(check_template(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_tenant_is_read_from_iss_and_must_be_accepted() {
        let t = TenantTemplate::new(
            [
                "https://sso.example.com/realms/{tenant}",
                "https://sso.internal/realms/{tenant}",
            ],
            listed(&["shop", "billing"]),
        );
        assert_eq!(t.tenant_of("https://sso.example.com/realms/shop"), Some("shop"));
        assert_eq!(t.tenant_of("https://sso.internal/realms/billing"), Some("billing"));
        assert_eq!(t.tenant_of("https://sso.example.com/realms/other"), None);
        assert_eq!(t.tenant_of("https://sso.example.com/realms/"), None);
        assert_eq!(t.tenant_of("https://sso.example.com/realms/shop/x"), None);
        assert_eq!(t.tenant_of("https://evil.example.com/realms/shop"), None);
        let p = TenantTemplate::new(
            ["https://sso.example.com/realms/{tenant}"],
            TenantSet::pattern("^[a-z0-9-]{1,40}$", 10).unwrap(),
        );
        assert_eq!(p.tenant_of("https://sso.example.com/realms/team-7"), Some("team-7"));
        assert_eq!(p.tenant_of("https://sso.example.com/realms/Team"), None);
        assert_eq!(p.tenant_of("https://sso.example.com/realms/a/b"), None);
        // a pattern that accepts anything still never yields a dot segment or an escape
        let any = TenantTemplate::new(
            ["https://sso.example.com/realms/{tenant}"],
            TenantSet::pattern("^.+$", 10).unwrap(),
        );
        for bad in ["..", ".", "%2e%2e", "a%2Fb", "a b", "a?b", "a#b"] {
            assert_eq!(
                any.tenant_of(&format!("https://sso.example.com/realms/{bad}")),
                None,
                "{bad}"
            );
        }
        assert_eq!(any.tenant_of("https://sso.example.com/realms/a.b"), Some("a.b"));
    }

    #[test]
    fn patterns_match_the_whole_tenant() {
        for pattern in ["^[a-z]+$", "[a-z]+", "^[a-z]+", "[a-z]+$", "shop|billing"] {
            let re = compile_pattern(pattern).unwrap();
            assert!(re.is_match("shop"), "{pattern}");
            for not in ["shop!", "!shop", "shop/x", "SHOP", ""] {
                assert!(!re.is_match(not), "{pattern} must not match {not:?}");
            }
        }
        assert!(!compile_pattern("shop|billing").unwrap().is_match("shopbilling"));
        assert!(compile_pattern("^[a-z+$").is_err());
        assert_eq!(fill("https://h/realms/{tenant}/x", "shop"), "https://h/realms/shop/x");
        assert!(check_tenant_name("shop").is_ok());
        for bad in ["", "a/b", "..", "a b", "a?b", "%2e%2e"] {
            assert!(check_tenant_name(bad).is_err(), "{bad:?}");
        }
    }
}
