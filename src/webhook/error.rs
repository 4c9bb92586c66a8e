//! [`ApiError`]: every way a webhook request fails, as the JSON body DESIGN.md promises
//! (`{"error": "..."}`, naming the problem). A 5xx says nothing about the cause; the cause
//! goes to the log.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::store::StoreError;

/// Why a request was refused. The `Display` text is the `error` field of the response.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body stream broke off (client went away, bad chunked encoding).
    #[error("could not read body: {0}")]
    BodyUnreadable(String),
    #[error("body is not valid JSON: {0}")]
    BadJson(String),
    #[error("body must be a JSON object")]
    NotAnObject,
    /// A required field (`agentId`, `phoneNumber`) is absent.
    #[error("{0} is required")]
    MissingField(&'static str),
    /// A required field is there but is not a JSON string (null included).
    #[error("{0} must be a string")]
    NotAString(&'static str),
    /// Path segments that do not decode (invalid percent-encoding or UTF-8).
    #[error("invalid path: {0}")]
    BadPath(String),
    #[error("missing API key")]
    MissingKey,
    /// The key belongs to no agent.
    #[error("invalid API key")]
    InvalidKey,
    /// The key is valid, for some other agent.
    #[error("API key not valid for agent {0:?}")]
    KeyNotForAgent(String),
    #[error("unknown agent {0:?}")]
    UnknownAgent(String),
    #[error("no context for agent {agent:?} and phoneNumber {number:?}")]
    NoContext { agent: String, number: String },
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("method {0} not allowed here")]
    MethodNotAllowed(String),
    #[error("body is larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("phoneNumber {0:?} is not a phone number")]
    BadNumber(String),
    /// The store failed. The message deliberately omits the cause (`#[source]`, logged).
    #[error("store unavailable")]
    StoreUnavailable(#[source] StoreError),
    /// The memory store holds `store.max_contexts` contexts and this key is new.
    #[error("context store full")]
    StoreFull,
    /// Over `http.rate_limit_per_sec` for this key.
    #[error("too many requests for this API key")]
    RateLimited { retry_after_secs: u64 },
    /// The agent has a `webhook_secret` and the signature is missing or wrong.
    #[error("{0}")]
    BadSignature(&'static str),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BodyUnreadable(_)
            | ApiError::BadJson(_)
            | ApiError::NotAnObject
            | ApiError::MissingField(_)
            | ApiError::NotAString(_)
            | ApiError::BadPath(_) => StatusCode::BAD_REQUEST,
            ApiError::MissingKey
            | ApiError::InvalidKey
            | ApiError::KeyNotForAgent(_)
            | ApiError::BadSignature(_) => StatusCode::UNAUTHORIZED,
            ApiError::UnknownAgent(_) | ApiError::NoContext { .. } | ApiError::NoRoute { .. } => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BadNumber(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::StoreUnavailable(_) | ApiError::StoreFull => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Full { .. } => ApiError::StoreFull,
            other => ApiError::StoreUnavailable(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::StoreUnavailable(cause) = &self {
            tracing::warn!(error = %cause, "webhook request failed: store unavailable");
        }
        if let ApiError::StoreFull = &self {
            tracing::warn!("webhook refused: context store full (store.max_contexts)");
        }
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            // Expired contexts are swept every second: room may come back that soon.
            ApiError::StoreFull => Some(1),
            _ => None,
        };
        let status = self.status();
        let mut response = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: tell the client which scheme we expect.
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_quote_the_offending_value() {
        assert_eq!(
            ApiError::UnknownAgent("x".to_string()).to_string(),
            r#"unknown agent "x""#
        );
        assert_eq!(
            ApiError::KeyNotForAgent("x".to_string()).to_string(),
            r#"API key not valid for agent "x""#
        );
        assert_eq!(
            ApiError::MissingField("agentId").to_string(),
            "agentId is required"
        );
    }

    #[test]
    fn a_store_failure_leaks_nothing() {
        let error = ApiError::from(StoreError::Unavailable("redis at 10.0.0.7 refused".into()));
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.to_string(), "store unavailable");
    }

    #[test]
    fn unauthorized_names_the_scheme() {
        let response = ApiError::MissingKey.into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
