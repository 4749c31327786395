//! Parser for `WWW-Authenticate` headers (RFC 7235 challenges).
//!
//! A header value may hold several challenges, each a scheme followed by
//! either a token68 or a comma-separated list of `name=value` parameters
//! whose values may be quoted strings containing commas, `=` and escaped
//! quotes, e.g.
//! `Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"`.

/// One authentication challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The scheme, lower-cased (`basic`, `bearer`, …).
    pub scheme: String,
    /// Parameters in order; names are lower-cased, values unescaped.
    pub params: Vec<(String, String)>,
    /// A token68 given instead of parameters, if any.
    pub token68: Option<String>,
}

impl Challenge {
    /// The value of parameter `name` (case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn skip_ws_and_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.i += 1;
        }
    }
    fn token(&mut self) -> &str {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        // Only ASCII tchars were consumed, so this cannot fail.
        std::str::from_utf8(&self.s[start..self.i]).unwrap_or_default()
    }
    /// A quoted string starting at the opening quote; returns the unescaped
    /// content. An unterminated string runs to the end of the input.
    fn quoted(&mut self) -> String {
        let mut out = Vec::new();
        self.i += 1; // opening quote
        while let Some(c) = self.peek() {
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    if let Some(n) = self.peek() {
                        out.push(n);
                        self.i += 1;
                    }
                }
                _ => out.push(c),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    /// An unquoted value: lenient, runs to the next comma or whitespace so
    /// that unquoted URLs survive.
    fn bare_value(&mut self) -> String {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| !matches!(c, b',' | b' ' | b'\t'))
        {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }
    /// Skips anything up to the next comma (error recovery).
    fn skip_to_comma(&mut self) {
        while let Some(c) = self.peek() {
            if c == b',' {
                break;
            }
            self.i += 1;
        }
    }
}

/// Parses every challenge in one `WWW-Authenticate` header value.
/// Malformed parts are skipped rather than failing the whole header.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut c = Cursor {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out: Vec<Challenge> = Vec::new();
    loop {
        c.skip_ws_and_commas();
        if c.peek().is_none() {
            break;
        }
        let scheme = c.token().to_ascii_lowercase();
        if scheme.is_empty() {
            // Garbage where a scheme should be: skip it.
            c.i += 1;
            c.skip_to_comma();
            continue;
        }
        let mut ch = Challenge {
            scheme,
            params: Vec::new(),
            token68: None,
        };
        // Parameters (or a token68) follow after whitespace.
        c.skip_ws();
        let mut first = true;
        loop {
            c.skip_ws();
            let save = c.i;
            let name = c.token().to_string();
            if name.is_empty() {
                if first {
                    break;
                }
                // e.g. a stray character: recover at the next comma.
                if c.peek().is_some() && c.peek() != Some(b',') {
                    c.skip_to_comma();
                }
                if c.peek() == Some(b',') {
                    c.i += 1;
                    continue;
                }
                break;
            }
            c.skip_ws();
            if c.peek() != Some(b'=') {
                // Not a parameter: either the next challenge's scheme or
                // (right after the scheme) a token68 without padding.
                if first && matches!(c.peek(), None | Some(b',')) && is_token68(&name) {
                    // `Scheme token68`: a lone word directly after the
                    // scheme (separated by whitespace, not a comma).
                    ch.token68 = Some(name);
                    break;
                }
                c.i = save;
                break;
            }
            // Count '=' to tell token68 padding (`abc==`) from `name=value`.
            let eq_start = c.i;
            while c.peek() == Some(b'=') {
                c.i += 1;
            }
            let eqs = c.i - eq_start;
            c.skip_ws();
            if eqs > 1 || (first && matches!(c.peek(), None | Some(b','))) {
                // token68 with padding, e.g. `Negotiate YWJj==`.
                if first {
                    ch.token68 = Some(format!("{name}{}", "=".repeat(eqs)));
                }
                break;
            }
            let value = match c.peek() {
                Some(b'"') => c.quoted(),
                _ => c.bare_value(),
            };
            ch.params.push((name.to_ascii_lowercase(), value));
            first = false;
            c.skip_ws();
            match c.peek() {
                Some(b',') => {
                    c.i += 1;
                }
                None => break,
                Some(_) => {
                    // Junk after a value: recover at the next comma.
                    c.skip_to_comma();
                    if c.peek() == Some(b',') {
                        c.i += 1;
                    }
                }
            }
        }
        out.push(ch);
    }
    out
}

fn is_token68(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_bearer() {
        let v = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].scheme, "bearer");
        assert_eq!(v[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(v[0].param("service"), Some("registry.docker.io"));
        assert_eq!(
            v[0].param("scope"),
            Some("repository:library/alpine:pull,push")
        );
    }

    #[test]
    fn basic_and_case_insensitivity() {
        let v = parse_challenges(r#"BASIC Realm="my realm""#);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].scheme, "basic");
        assert_eq!(v[0].param("realm"), Some("my realm"));
        assert_eq!(v[0].param("REALM"), Some("my realm"));
    }

    #[test]
    fn multiple_challenges_in_one_header() {
        let v = parse_challenges(
            r#"Basic realm="a, b", Bearer realm="https://t/x?a=b",service=svc , error="insufficient_scope""#,
        );
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].scheme, "basic");
        assert_eq!(v[0].param("realm"), Some("a, b"));
        assert_eq!(v[1].scheme, "bearer");
        assert_eq!(v[1].param("realm"), Some("https://t/x?a=b"));
        assert_eq!(v[1].param("service"), Some("svc"));
        assert_eq!(v[1].param("error"), Some("insufficient_scope"));
    }

    #[test]
    fn escaped_quotes_and_whitespace() {
        let v = parse_challenges("  Bearer   realm = \"x\\\"y\\\\z\" ,\tscope=\"s\"  ");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].param("realm"), Some("x\"y\\z"));
        assert_eq!(v[0].param("scope"), Some("s"));
    }

    #[test]
    fn token68_and_bare_schemes() {
        let v = parse_challenges("Negotiate YWJjZA==, Basic realm=r");
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0].scheme, "negotiate");
        assert_eq!(v[0].token68.as_deref(), Some("YWJjZA=="));
        assert_eq!(v[1].param("realm"), Some("r"));

        let v = parse_challenges("Bearer");
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].scheme, "bearer");
        assert!(v[0].params.is_empty());
    }

    #[test]
    fn empty_and_garbage() {
        assert!(parse_challenges("").is_empty());
        assert!(parse_challenges(" , ,").is_empty());
        let v = parse_challenges(r#"Bearer realm="unterminated"#);
        assert_eq!(v[0].param("realm"), Some("unterminated"));
        let v = parse_challenges(r#"Bearer realm="r",@@@,service="s""#);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].param("realm"), Some("r"));
        assert_eq!(v[0].param("service"), Some("s"));
    }

    #[test]
    fn empty_quoted_value_and_unquoted_url() {
        let v = parse_challenges(r#"Bearer realm=https://a.b/token,service="""#);
        assert_eq!(v[0].param("realm"), Some("https://a.b/token"));
        assert_eq!(v[0].param("service"), Some(""));
    }
}
