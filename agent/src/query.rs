//! The one percent-encoding codec of URL query values, shared by the registry client (token
//! and upload URLs), the HTTP API (filters) and the report client (which builds those
//! filters). Encoding keeps RFC 3986's unreserved characters and escapes every other byte;
//! decoding is strict (a `%` must start two hex digits) and also takes `+` for a space, as
//! HTML forms send it.

/// `s` with every byte outside `A-Z a-z 0-9 - _ . ~` written as `%XX`.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text a query value encodes; `None` for a malformed escape or bytes that are not UTF-8.
pub fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `key=value&...` with each value encoded.
pub fn build<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(key, value)| format!("{key}={}", encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_what_is_reserved_and_decodes_it_back() {
        assert_eq!(encode("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
        for s in ["repository:a/b:pull", "ünïcode & = %", "", "plain"] {
            assert_eq!(decode(&encode(s)).as_deref(), Some(s));
        }
        assert_eq!(decode("a+b").as_deref(), Some("a b"));
        assert_eq!(
            build([("pod", "web 1"), ("image", "r/x:1")]),
            "pod=web%201&image=r%2Fx%3A1"
        );
    }

    #[test]
    fn malformed_escapes_are_refused() {
        for bad in ["%zz", "%", "%4", "%+1", "%ff"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
