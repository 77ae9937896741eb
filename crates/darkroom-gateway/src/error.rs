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

/// `Path<String>` whose rejection (e.g. invalid UTF-8) is a typed `invalid_request`, like every other error.
#[derive(Debug)]
pub struct ApiPath(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ApiPath {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| ApiPath(p))
            .map_err(|e| err(ErrorType::InvalidRequest, e.body_text()))
    }
}

/// `Query<T>` whose rejection is a typed `invalid_request`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiErr;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| ApiQuery(q))
            .map_err(|e| err(ErrorType::InvalidRequest, e.body_text()))
    }
}
