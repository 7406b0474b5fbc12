//! URLs and headers as the registry client handles them: redirect and upload locations
//! resolved against the URL they came from, hosts compared for credentials, range and length
//! headers read strictly.

use http::{HeaderMap, HeaderValue, Uri, header, uri::PathAndQuery};

use crate::registry::RegistryError;

/// `location` resolved against `base` (RFC 3986 for what registries send: an absolute URL,
/// an absolute path, or a path relative to base's directory; a query is kept). `None` when
/// either does not parse.
pub(super) fn resolve(base: &str, location: &str) -> Option<String> {
    if let Ok(absolute) = location.parse::<Uri>()
        && absolute.scheme().is_some()
        && absolute.authority().is_some()
    {
        return Some(absolute.to_string());
    }
    let base: Uri = base.parse().ok()?;
    let joined = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(dir, _)| dir);
        format!("{dir}/{location}")
    };
    let path_and_query: PathAndQuery = joined.parse().ok()?;
    let resolved = Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(path_and_query)
        .build()
        .ok()?;
    Some(resolved.to_string())
}

/// [`resolve`], or an error naming what could not be resolved.
pub(super) fn resolve_or_err(base: &str, location: &str) -> Result<String, RegistryError> {
    resolve(base, location).ok_or_else(|| RegistryError::BadLocation {
        base: base.into(),
        location: location.chars().take(300).collect(),
    })
}

/// The host and port of `url` (empty when it has none): credentials stay with one.
pub(super) fn authority(url: &str) -> String {
    url.parse::<Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().to_ascii_lowercase()))
        .unwrap_or_default()
}

/// The scheme and the host and port of `url`: credentials for one are never sent to
/// another (an https -> http redirect to the same host drops them too).
pub(super) fn origin_of(url: &str) -> String {
    let scheme = url
        .parse::<Uri>()
        .ok()
        .and_then(|u| u.scheme_str().map(str::to_ascii_lowercase))
        .unwrap_or_default();
    format!("{scheme}://{}", authority(url))
}

/// Whether `url` is https.
pub(super) fn is_https(url: &str) -> bool {
    url.parse::<Uri>().ok().is_some_and(|u| {
        u.scheme_str()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
    })
}

/// The host of `url`, without its port.
pub(super) fn host(url: &str) -> String {
    url.parse::<Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_ascii_lowercase))
        .unwrap_or_default()
}

pub(super) fn header_value(s: &str) -> Result<HeaderValue, RegistryError> {
    HeaderValue::from_str(s)
        .map_err(|_| RegistryError::BadHeaderValue(s.chars().take(300).collect()))
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `START`, `END` and `TOTAL` of `bytes START-END/TOTAL` (`END` inclusive).
pub(super) fn content_range(v: &str) -> Option<(u64, u64, u64)> {
    let (span, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    Some((
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

/// The first byte of `bytes START-END/TOTAL`.
pub(super) fn content_range_start(v: &str) -> Option<u64> {
    v.strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The start of a body, for error messages.
pub(super) fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_against_their_base() {
        let r = |base, loc| resolve(base, loc).unwrap();
        assert_eq!(
            r(
                "http://r:5000/v2/a/blobs/uploads/",
                "/v2/a/blobs/uploads/u?_state=x"
            ),
            "http://r:5000/v2/a/blobs/uploads/u?_state=x"
        );
        assert_eq!(r("http://r:5000", "http://s/x"), "http://s/x");
        assert_eq!(r("http://r:5000/v2/a/x", "y"), "http://r:5000/v2/a/y");
        assert_eq!(r("https://r/v2/a/x?q=1", "y?z=2"), "https://r/v2/a/y?z=2");
        assert_eq!(resolve("not a url", "/x"), None);
        assert_eq!(resolve("http://r/", "bad location"), None);
        assert!(resolve_or_err("http://r/", "bad location").is_err());
    }

    #[test]
    fn hosts_and_headers() {
        assert_eq!(authority("https://A.b:1/c"), "a.b:1");
        assert_eq!(authority("/relative"), "");
        assert_eq!(content_range_start("bytes 100-199/1000"), Some(100));
        assert_eq!(content_range_start("items 1-2"), None);
        assert_eq!(content_range("bytes 949-999/1000"), Some((949, 999, 1000)));
        // A total the server does not know, or no span: nothing a suffix read can check.
        assert_eq!(content_range("bytes 949-999/*"), None);
        assert_eq!(content_range("bytes */1000"), None);
        assert!(header_value("bad\nvalue").is_err());
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    #[test]
    fn an_origin_is_scheme_host_and_port() {
        let a = "https://reg.example:5000/v2/app/blobs/x";
        assert_eq!(origin_of(a), "https://reg.example:5000");
        assert_eq!(origin_of("https://REG.example:5000/other"), origin_of(a));
        // Same host, plain HTTP: another origin, so a redirect there drops the credentials.
        assert_ne!(
            origin_of("http://reg.example:5000/v2/app/blobs/x"),
            origin_of(a)
        );
        assert_ne!(origin_of("https://reg.example:5001/"), origin_of(a));
        assert!(is_https(a) && !is_https("http://reg.example/"));
        assert_eq!(host("http://Auth.example:8080/token?x=1"), "auth.example");
    }
}
