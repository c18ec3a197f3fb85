//! The one error every surface answers with: a stable code, a sentence that
//! names what was wrong, and how each transport spells it (gRPC status,
//! HTTP status + JSON body; the Socket.IO edge sends the same code and
//! message). Every domain error is mapped to its code here, each variant by
//! name, so a new refusal cannot fall into a catch-all.

use std::fmt;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::auth::rbac::Denied;
use crate::broker::{FilterError, TooManySubscribers};
use crate::event::EventError;
use crate::event::json::BodyError;

/// Stable error codes, shared by gRPC (as status codes), HTTP (the `code`
/// field) and streaming publish acks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    ResourceExhausted,
    NotFound,
    Unavailable,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::NotFound => "not_found",
            Code::Unavailable => "unavailable",
            Code::Internal => "internal",
        }
    }

    pub fn grpc(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::NotFound => tonic::Code::NotFound,
            Code::Unavailable => tonic::Code::Unavailable,
            Code::Internal => tonic::Code::Internal,
        }
    }

    pub fn http(self) -> StatusCode {
        match self {
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    #[serde(serialize_with = "code_str")]
    pub code: Code,
    pub message: String,
}

fn code_str<S: serde::Serializer>(code: &Code, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(code.as_str())
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// Prefixes the message with where in a batch the error is, e.g.
    /// `events[3].type: ...`.
    pub fn at_index(mut self, index: usize) -> Self {
        self.message = format!("events[{index}].{}", self.message);
        self
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<EventError> for ApiError {
    fn from(e: EventError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<TooManySubscribers> for ApiError {
    fn from(e: TooManySubscribers) -> Self {
        Self::new(Code::ResourceExhausted, e.to_string())
    }
}

impl From<FilterError> for ApiError {
    fn from(e: FilterError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        Self::invalid(e.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        use AuthError as A;
        let code = match e {
            A::KeysUnavailable { .. } | A::MembershipsUnavailable => Code::Unavailable,
            A::NoMembership { .. } | A::NoMemberships => Code::PermissionDenied,
            A::ActiveTenantRequired { .. } => Code::InvalidArgument,
            A::Missing
            | A::NotBearer
            | A::Malformed(_)
            | A::AlgNone
            | A::WrongAlgorithm { .. }
            | A::CognitoNotConfigured
            | A::UnknownKey { .. }
            | A::UnknownKeyRecentlyChecked { .. }
            | A::WrongIssuer
            | A::WrongAudience
            | A::WrongTokenUse { .. }
            | A::InvalidSignature
            | A::InvalidPoolSignature { .. }
            | A::Expired { .. }
            | A::NoExpiry
            | A::ExpTooFar { .. }
            | A::NotYetValid
            | A::NoTenant
            | A::BadTenant(_)
            | A::BadAgent(_) => Code::Unauthenticated,
        };
        Self::new(code, e.to_string())
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> Self {
        let code = match e {
            Denied::BadTenant(_) | Denied::TenantRequired => Code::InvalidArgument,
            Denied::MissingScope { .. } | Denied::OtherTenant { .. } => Code::PermissionDenied,
        };
        Self::new(code, e.to_string())
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.code.grpc(), e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let unauthenticated = self.code == Code::Unauthenticated;
        let mut response = (self.code.http(), axum::Json(self)).into_response();
        if unauthenticated {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
