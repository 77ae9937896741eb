//! Endpoint ids (`[ns/]owner/alias[/path]`) and request ids.

use crate::error::{ApiError, ErrorType};

/// Namespaces that take an extra leading segment, as in both official clients.
pub const NAMESPACES: &[&str] = &["workflows", "comfy"];

/// An app: `[ns/]owner/alias`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AppRef {
    pub namespace: Option<String>,
    pub owner: String,
    pub alias: String,
}

impl AppRef {
    /// The canonical app id, e.g. `darkroom/diagnostics` or `workflows/me/wf`.
    pub fn id(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}/{}", self.owner, self.alias),
            None => format!("{}/{}", self.owner, self.alias),
        }
    }

    /// Parses a canonical app id (no endpoint path).
    pub fn parse(id: &str) -> Result<AppRef, ApiError> {
        let (app, path) = split_endpoint(&id.split('/').collect::<Vec<_>>())?;
        if !path.is_empty() {
            return Err(ApiError::new(ErrorType::InvalidRequest, format!("'{id}' is not an app id")));
        }
        Ok(app)
    }
}

impl std::fmt::Display for AppRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id())
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s != "."
        && s != ".."
}

/// Splits path segments into the app and the remaining endpoint path segments.
pub fn split_endpoint<'a>(segs: &[&'a str]) -> Result<(AppRef, Vec<&'a str>), ApiError> {
    let bad = |m: &str| ApiError::new(ErrorType::InvalidRequest, m.to_string());
    let (namespace, rest) = match segs.first() {
        Some(first) if NAMESPACES.contains(first) => (Some(first.to_string()), &segs[1..]),
        _ => (None, segs),
    };
    if rest.len() < 2 {
        // The legacy `123-app` form becomes `123/app`, as the JS client normalises it.
        if rest.len() == 1
            && namespace.is_none()
            && let Some((num, app)) = rest[0].split_once('-')
            && !num.is_empty()
            && num.chars().all(|c| c.is_ascii_digit())
            && valid_segment(app)
        {
            return Ok((AppRef { namespace: None, owner: num.into(), alias: app.into() }, vec![]));
        }
        return Err(bad("endpoint id must be [namespace/]owner/alias[/path]"));
    }
    for s in rest {
        if !valid_segment(s) {
            return Err(bad(&format!("invalid endpoint id segment '{}'", s.escape_default())));
        }
    }
    Ok((AppRef { namespace, owner: rest[0].into(), alias: rest[1].into() }, rest[2..].to_vec()))
}

/// Generates a new request id (UUID v7: time-ordered).
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Validates a request id from a URL: any UUID, in its hyphenated lower-case form.
pub fn parse_request_id(s: &str) -> Result<String, ApiError> {
    match uuid::Uuid::try_parse(s) {
        Ok(u) => Ok(u.hyphenated().to_string()),
        Err(_) => {
            Err(ApiError::new(ErrorType::InvalidRequest, format!("'{}' is not a valid request id", s.escape_default())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_namespaced_and_legacy() {
        let (a, p) = split_endpoint(&["fal-ai", "flux", "dev"]).unwrap();
        assert_eq!(a.id(), "fal-ai/flux");
        assert_eq!(p, vec!["dev"]);
        let (a, p) = split_endpoint(&["workflows", "me", "wf", "sub"]).unwrap();
        assert_eq!(a.id(), "workflows/me/wf");
        assert_eq!(p, vec!["sub"]);
        let (a, _) = split_endpoint(&["123-app"]).unwrap();
        assert_eq!(a.id(), "123/app");
        assert!(split_endpoint(&["onlyowner"]).is_err());
        assert!(split_endpoint(&["workflows", "me"]).is_err());
        assert!(split_endpoint(&["a", ".."]).is_err());
        assert!(split_endpoint(&["a", "b c"]).is_err());
    }

    #[test]
    fn request_ids() {
        let id = new_request_id();
        assert_eq!(parse_request_id(&id).unwrap(), id);
        assert_eq!(parse_request_id(&id.to_uppercase()).unwrap(), id);
        assert!(parse_request_id("../etc").is_err());
        assert!(parse_request_id("").is_err());
    }
}
