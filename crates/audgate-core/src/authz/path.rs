//! The request path as the upstream will resolve it: the one spelling route matching sees, so
//! no spelling of a path (dot segments, repeated slashes, percent-encoded dots) can pick a
//! weaker route than the resource that is served.
//!
//! [`normalize`], in this order (SPEC.md, "Routes match a request as the upstream will
//! resolve it"):
//! 1. percent-encoded unreserved characters (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`) are decoded;
//!    every other escape stays, its hex digits upper-cased (`%2f` -> `%2F`), so encoded slashes
//!    and backslashes stay encoded as in Envoy's default;
//! 2. repeated slashes are merged;
//! 3. `.` and `..` segments are removed (RFC 3986 §5.2.4); `..` above the root stays at the
//!    root. A segment that is a dot segment once its `;` parameters are dropped (`..;x`) counts
//!    as one too: Tomcat, Jetty and Spring resolve `/public/..;/admin` to `/admin`.
//!
//! The query is not part of the input. The result starts with `/`, holds no `//`, no `.` or `..`
//! segment and no encoded unreserved character, and normalizing it again changes nothing.

use std::borrow::Cow;

/// `path` (without its query) as route matching sees it; borrowed when already normal.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if needs_no_work(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut out = String::with_capacity(decoded.len() + 1);
    // segments kept so far, as byte offsets of their leading `/` in `out`
    let mut starts: Vec<usize> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len() - 1;
    let mut ends_in_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        ends_in_slash = false;
        match dot_segment(segment) {
            Some(Dots::One) => ends_in_slash = true,
            Some(Dots::Two) => {
                if let Some(start) = starts.pop() {
                    out.truncate(start);
                }
                ends_in_slash = true;
            }
            // an empty segment: a leading `/`, a repeated `/` or a trailing `/`
            None if segment.is_empty() => ends_in_slash = i == last && i > 0,
            None => {
                starts.push(out.len());
                out.push('/');
                out.push_str(segment);
            }
        }
    }
    if out.is_empty() || ends_in_slash {
        out.push('/');
    }
    Cow::Owned(out)
}

/// SPEC.md's promise about a normalized path, checked on the text: it starts with `/` and has
/// no `//`, no `.` or `..` segment (also with `;` parameters), no encoded unreserved
/// character and no `%` that does not start an upper-case escape. [`normalize`]'s output always passes; the property tests and the fuzz target
/// check that.
pub fn is_normalized(path: &str) -> bool {
    let bytes = path.as_bytes();
    let escapes_ok =
        bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'%')
            .all(|(i, _)| match bytes.get(i + 1..i + 3) {
                Some(&[hi, lo]) => match hex(hi).zip(hex(lo)) {
                    Some((h, l)) => !is_unreserved(h << 4 | l) && !hi.is_ascii_lowercase() && !lo.is_ascii_lowercase(),
                    None => false,
                },
                _ => false,
            });
    path.starts_with('/') && !path.contains("//") && !path.split('/').any(|s| dot_segment(s).is_some()) && escapes_ok
}

/// A fast, conservative [`is_normalized`] for the request path: true only when `path` starts
/// with `/` and has no `%`, no empty segment but a final one and no dot segment, so
/// [`normalize`] can return it as it is.
fn needs_no_work(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path.contains('%') {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || dot_segment(segment).is_some() {
            return false;
        }
    }
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dots {
    One,
    Two,
}

/// `.` / `..`, also with `;` parameters (`..;jsessionid=x`).
fn dot_segment(segment: &str) -> Option<Dots> {
    let name = segment.split(';').next().unwrap_or(segment);
    match name {
        "." => Some(Dots::One),
        ".." => Some(Dots::Two),
        _ => None,
    }
}

/// Decode `%XX` of unreserved characters; upper-case the hex of every other valid escape. A `%`
/// not followed by two hex digits (Envoy passes such paths through) becomes `%25`, so that
/// decoding a later escape can never make it the start of a new one (`%%41` -> `%25A`, not
/// `%A`, which a second pass would read differently).
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = match bytes.get(i..i + 3) {
            Some([b'%', hi, lo]) => hex(*hi).zip(hex(*lo)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escape {
            Some(byte) if is_unreserved(byte) => {
                out.push(char::from(byte));
                i += 3;
            }
            Some(_) => {
                out.push('%');
                out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                i += 3;
            }
            None if bytes[i] == b'%' => {
                out.push_str("%25");
                i += 1;
            }
            None => {
                // copy up to the next `%` (or the end) in one go; `%` is ASCII, so this is a
                // char boundary
                let next = path[i..].find('%').map_or(bytes.len(), |n| i + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize(p).into_owned()
    }

    #[test]
    fn dot_segments_are_resolved_as_the_upstream_does() {
        assert_eq!(n("/public/../strict/x"), "/strict/x");
        assert_eq!(n("/public/./x"), "/public/x");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/a/b/../../../../c"), "/c", "`..` above the root stays at the root");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/."), "/");
        assert_eq!(n("/a/.b/..c/...").as_str(), "/a/.b/..c/...", "only whole dot segments");
        assert_eq!(
            n("/.well-known/openid-configuration"),
            "/.well-known/openid-configuration"
        );
    }

    #[test]
    fn percent_encoded_dots_and_letters_are_decoded_first() {
        assert_eq!(n("/public/%2e%2e/strict/x"), "/strict/x");
        assert_eq!(n("/public/%2E%2E/strict/x"), "/strict/x");
        assert_eq!(n("/public/.%2e/strict"), "/strict");
        assert_eq!(n("/%61dmin"), "/admin");
        assert_eq!(n("/a%7Eb%2D%5f"), "/a~b-_");
    }

    #[test]
    fn encoded_slashes_and_other_escapes_stay_encoded_in_one_spelling() {
        assert_eq!(n("/public%2F..%2Fstrict"), "/public%2F..%2Fstrict");
        assert_eq!(n("/public%2f..%2fstrict"), "/public%2F..%2Fstrict");
        assert_eq!(n("/a%5cb"), "/a%5Cb");
        assert_eq!(n("/a%252e%252e/b"), "/a%252e%252e/b", "double encoding is not decoded");
        assert_eq!(n("/a%zz/%4"), "/a%25zz/%254", "a stray % is spelled %25");
        assert_eq!(n("/%%41aa"), "/%25Aaa");
        assert_eq!(n("/caf%C3%A9"), "/caf%C3%A9");
    }

    #[test]
    fn repeated_slashes_merge_before_dot_segments() {
        assert_eq!(n("/public//../strict/x"), "/strict/x");
        assert_eq!(n("//strict"), "/strict");
        assert_eq!(n("/a///b//"), "/a/b/");
        assert_eq!(n("/"), "/");
    }

    #[test]
    fn parameters_on_dot_segments_do_not_hide_them() {
        assert_eq!(n("/public;x/../admin"), "/admin");
        assert_eq!(n("/public/..;/admin"), "/admin");
        assert_eq!(n("/public/..;jsessionid=1/admin"), "/admin");
        assert_eq!(n("/public/.;x/y"), "/public/y");
        assert_eq!(n("/admin;x"), "/admin;x", "parameters of other segments are kept");
    }

    #[test]
    fn a_path_without_a_leading_slash_is_rooted() {
        assert_eq!(n(""), "/");
        assert_eq!(n("*"), "/*");
        assert_eq!(n("a/../b"), "/b");
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/api/orders", "/api/orders/", "/a;b", "/.well-known/x", "/a..b"] {
            assert!(needs_no_work(p) && is_normalized(p), "{p}");
            assert!(matches!(normalize(p), Cow::Borrowed(_)), "{p}");
        }
        for p in ["", "a", "//", "/a//b", "/a/./b", "/a/..", "/%41", "/..;x/a"] {
            assert!(!needs_no_work(p), "{p}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in [
            "/a/%2e%2E/b//c/./d/..;x/%2f%41%5c",
            "/..%2f..",
            "/%2e%2e%2f",
            "//..//..//",
            "/a/b/%2E",
        ] {
            let once = n(p);
            assert_eq!(n(&once), once, "{p}");
            assert!(is_normalized(&once), "{p} -> {once}");
        }
    }

    /// Property: over paths built from the characters that matter (slashes, dots, escapes of
    /// dots and slashes, parameters), the result is normalized and stable. A fixed-seed
    /// generator keeps the run reproducible; the `path` fuzz target explores further.
    #[test]
    fn every_spelling_from_the_dangerous_alphabet_normalizes_for_good() {
        const PIECES: [&str; 14] = [
            "/", "/", ".", "..", "%2e", "%2E", "%2f", "%5C", "%", ";x", "a", "B", "%41", "~",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let len = next() % 12;
            let p: String = (0..len).map(|_| PIECES[(next() % 14) as usize]).collect();
            let once = n(&p);
            assert!(is_normalized(&once), "{p:?} -> {once:?}");
            assert_eq!(n(&once), once, "{p:?}");
        }
    }
}
