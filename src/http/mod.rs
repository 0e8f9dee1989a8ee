//! HTTP plumbing shared by every capability: the error body, extractors, authentication of admin
//! keys, pagination, and the middleware stack.

pub mod auth;
pub mod error;
pub mod extract;
pub mod head_limits;
pub mod keep_alive;
pub mod page;
pub mod query_guard;
pub mod server;

pub use auth::{AdminAuth, Permission, Role};
pub use error::{ApiError, ApiResult, ErrorDetail};
pub use extract::{IfMatch, Json, JsonBody, OptionalJsonBody, Path, Query};
pub use page::{Page, PageQuery};
