//! Routing of the queue and run hosts' paths, independent of the HTTP framework.
//!
//! On the queue host the path is `[ns/]owner/alias` followed by either `requests/{id}[/status[/stream]|/cancel]`
//! or an endpoint path; the word `requests` right after the alias is reserved (fal-protocol.md §1.2).

use crate::error::{ApiError, ErrorType};
use crate::ids::{AppRef, parse_request_id, split_endpoint};

/// What a request on the queue host asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueRoute {
    Submit { app: AppRef, path: String },
    Status { app: AppRef, request_id: String },
    StatusStream { app: AppRef, request_id: String },
    Result { app: AppRef, request_id: String },
    Cancel { app: AppRef, request_id: String },
    OpenApi { app: AppRef },
}

/// What a request on the run host asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunRoute {
    Run { app: AppRef, path: String },
    Stream { app: AppRef, path: String },
    OpenApi { app: AppRef },
}

fn segments(path: &str) -> Vec<&str> {
    // Trailing slashes are accepted; empty segments elsewhere are not.
    let p = path.trim_start_matches('/');
    let p = p.strip_suffix('/').unwrap_or(p);
    if p.is_empty() { vec![] } else { p.split('/').collect() }
}

fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorType::MethodNotAllowed, "Method not allowed for this path")
}

/// Routes a queue-host path (without the `/queue` prefix) and method.
pub fn route_queue(method: &str, path: &str) -> Result<QueueRoute, ApiError> {
    let segs = segments(path);
    let (app, rest) = split_endpoint(&segs)?;
    if rest.first() == Some(&"requests") {
        let Some(rid) = rest.get(1) else {
            return Err(ApiError::new(ErrorType::NotFound, "missing request id after 'requests'"));
        };
        let request_id = parse_request_id(rid)?;
        return match (method, &rest[2..]) {
            ("GET", []) => Ok(QueueRoute::Result { app, request_id }),
            ("GET", ["status"]) => Ok(QueueRoute::Status { app, request_id }),
            ("GET", ["status", "stream"]) => Ok(QueueRoute::StatusStream { app, request_id }),
            ("PUT", ["cancel"]) => Ok(QueueRoute::Cancel { app, request_id }),
            (_, [] | ["status"] | ["status", "stream"] | ["cancel"]) => Err(method_not_allowed()),
            _ => Err(ApiError::new(ErrorType::NotFound, "unknown request sub-resource")),
        };
    }
    match method {
        "POST" => Ok(QueueRoute::Submit { app, path: rest.join("/") }),
        "GET" if rest == ["openapi.json"] => Ok(QueueRoute::OpenApi { app }),
        _ => Err(method_not_allowed()),
    }
}

/// Routes a run-host path (without the `/run` prefix) and method. `GET` runs take their input from the query.
pub fn route_run(method: &str, path: &str) -> Result<RunRoute, ApiError> {
    let segs = segments(path);
    let (app, mut rest) = split_endpoint(&segs)?;
    if method == "GET" && rest == ["openapi.json"] {
        return Ok(RunRoute::OpenApi { app });
    }
    if method != "POST" && method != "GET" {
        return Err(method_not_allowed());
    }
    if rest.last() == Some(&"stream") && method == "POST" {
        rest.pop();
        return Ok(RunRoute::Stream { app, path: rest.join("/") });
    }
    Ok(RunRoute::Run { app, path: rest.join("/") })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RID: &str = "0190b6b0-1c2d-7e3f-8a4b-5c6d7e8f9a0b";

    #[test]
    fn queue_routes() {
        let r = route_queue("POST", "/fal-ai/flux/dev").unwrap();
        assert!(matches!(r, QueueRoute::Submit { ref app, ref path } if app.id() == "fal-ai/flux" && path == "dev"));
        let r = route_queue("POST", "/darkroom/diagnostics").unwrap();
        assert!(matches!(r, QueueRoute::Submit { ref path, .. } if path.is_empty()));
        let r = route_queue("GET", &format!("/fal-ai/flux/requests/{RID}/status/")).unwrap();
        assert!(matches!(r, QueueRoute::Status { ref request_id, .. } if request_id == RID));
        let r = route_queue("GET", &format!("/workflows/me/wf/requests/{RID}/status/stream")).unwrap();
        assert!(matches!(r, QueueRoute::StatusStream { ref app, .. } if app.id() == "workflows/me/wf"));
        assert!(matches!(route_queue("GET", &format!("/a/b/requests/{RID}/")).unwrap(), QueueRoute::Result { .. }));
        assert!(matches!(
            route_queue("PUT", &format!("/a/b/requests/{RID}/cancel")).unwrap(),
            QueueRoute::Cancel { .. }
        ));
        assert_eq!(route_queue("POST", &format!("/a/b/requests/{RID}/cancel")).unwrap_err().status, 405);
        assert_eq!(
            route_queue("GET", "/a/b/requests/not-a-uuid/status").unwrap_err().error_type,
            ErrorType::InvalidRequest
        );
        assert_eq!(route_queue("GET", &format!("/a/b/requests/{RID}/bogus")).unwrap_err().status, 404);
        assert_eq!(route_queue("DELETE", "/a/b").unwrap_err().status, 405);
        assert!(matches!(route_queue("GET", "/a/b/openapi.json").unwrap(), QueueRoute::OpenApi { .. }));
        assert!(route_queue("POST", "/a").is_err());
    }

    #[test]
    fn run_routes() {
        assert!(matches!(route_run("POST", "/a/b").unwrap(), RunRoute::Run { ref path, .. } if path.is_empty()));
        assert!(matches!(route_run("POST", "/a/b/x/").unwrap(), RunRoute::Run { ref path, .. } if path == "x"));
        assert!(
            matches!(route_run("POST", "/a/b/stream").unwrap(), RunRoute::Stream { ref path, .. } if path.is_empty())
        );
        assert!(
            matches!(route_run("POST", "/a/b/x/stream").unwrap(), RunRoute::Stream { ref path, .. } if path == "x")
        );
        assert!(matches!(route_run("GET", "/a/b").unwrap(), RunRoute::Run { .. }));
        assert_eq!(route_run("DELETE", "/a/b").unwrap_err().status, 405);
    }
}
