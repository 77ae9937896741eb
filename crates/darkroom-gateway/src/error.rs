//! Rendering [`ApiError`] as HTTP.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use darkroom_core::{ApiError, ErrorType};

/// An [`ApiError`] as an axum response: JSON `{detail, error_type}`, `X-Fal-Error-Type`, `Retry-After`.
#[derive(Debug)]
pub struct ApiErr(pub ApiError);

impl From<ApiError> for ApiErr {
    fn from(e: ApiError) -> Self {
        ApiErr(e)
    }
}

impl From<darkroom_store::StoreError> for ApiErr {
    fn from(e: darkroom_store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiErr(ApiError::internal())
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(e.body())).into_response();
        let h = resp.headers_mut();
        h.insert("x-fal-error-type", HeaderValue::from_static(e.error_type.as_str()));
        if let Some(s) = e.retry_after {
            h.insert("retry-after", HeaderValue::from(s));
        }
        if e.error_type == ErrorType::RequestTimeout {
            h.insert("x-fal-request-timeout-type", HeaderValue::from_static("user"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiErr>;

pub fn err(t: ErrorType, msg: impl Into<String>) -> ApiErr {
    ApiErr(ApiError::new(t, msg))
}
