//! Refuses query parameters on routes that read none, as the routes that read some refuse the
//! ones they do not take (see [`super::Query`]): a parameter a client believes filters or
//! changes its request (`POST /v1/events?dry_run=true`) must not be ignored in silence. Which
//! routes read which parameters comes from the OpenAPI document, so the two cannot disagree.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::ApiError;

/// The keys of an OpenAPI path item that are operations.
const OPERATION_METHODS: [Method; 8] = [
    Method::GET,
    Method::PUT,
    Method::POST,
    Method::DELETE,
    Method::OPTIONS,
    Method::HEAD,
    Method::PATCH,
    Method::TRACE,
];

/// The operations (path template → methods) that take no query parameters.
#[derive(Clone, Debug, Default)]
pub struct QueryFreeRoutes(Arc<HashMap<String, Vec<Method>>>);

impl QueryFreeRoutes {
    /// Every `/v1/` operation of an OpenAPI document that declares no `in: query` parameter, on
    /// its own or on its path (references to `#/components/parameters/…` are followed).
    pub fn from_openapi(document: &Value) -> Self {
        let is_query = |parameter: &Value| {
            let parameter = match parameter.get("$ref").and_then(Value::as_str) {
                Some(pointer) => pointer
                    .strip_prefix('#')
                    .and_then(|pointer| document.pointer(pointer))
                    .unwrap_or(&Value::Null),
                None => parameter,
            };
            parameter.get("in").and_then(Value::as_str) == Some("query")
        };
        let declares_query = |item: &Value| {
            item.get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|list| list.iter().any(is_query))
        };
        let mut routes: HashMap<String, Vec<Method>> = HashMap::new();
        let paths = document.get("paths").and_then(Value::as_object);
        for (path, item) in paths.into_iter().flatten() {
            // The REST API only: `/mcp` speaks JSON-RPC to clients whose configured URL may
            // carry a query of its own, which the protocol does not forbid.
            if !path.starts_with("/v1/") || declares_query(item) {
                continue;
            }
            let Some(operations) = item.as_object() else {
                continue;
            };
            // A path item also holds `parameters`, `summary` and the like beside its operations.
            for (method, operation) in operations {
                let Some(method) = OPERATION_METHODS
                    .iter()
                    .find(|m| m.as_str().eq_ignore_ascii_case(method))
                else {
                    continue;
                };
                if !declares_query(operation) {
                    routes.entry(path.clone()).or_default().push(method.clone());
                }
            }
        }
        Self(Arc::new(routes))
    }

    fn takes_none(&self, method: &Method, path: &str) -> bool {
        self.0.get(path).is_some_and(|methods| methods.contains(method))
    }
}

/// Middleware (a route layer, so the matched route is known): a request with a query string to
/// an operation that takes no query parameters is a 400 `invalid_query` naming the first one.
pub async fn refuse_unread_query(
    State(routes): State<QueryFreeRoutes>,
    request: Request,
    next: Next,
) -> Response {
    let query = request.uri().query().filter(|q| !q.is_empty());
    let route = request.extensions().get::<MatchedPath>();
    if let (Some(query), Some(route)) = (query, route)
        && routes.takes_none(request.method(), route.as_str())
    {
        let first = query.split('&').next().unwrap_or_default();
        let name = first.split('=').next().unwrap_or_default();
        let name: String = name.chars().take(64).collect();
        return ApiError::bad_request(
            "invalid_query",
            format!(
                "{} {} takes no query parameters, so `{name}` would be ignored; send it in the body if it belongs there, or leave it out",
                request.method(),
                route.as_str()
            ),
        )
        .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn operations_without_query_parameters_are_found() {
        let document = json!({
            "components": {"parameters": {
                "IfMatch": {"name": "If-Match", "in": "header"},
                "Limit": {"name": "limit", "in": "query"}
            }},
            "paths": {
                "/v1/things": {
                    "summary": "Things",
                    "get": {"parameters": [{"$ref": "#/components/parameters/Limit"}]},
                    "post": {}
                },
                "/v1/things/{id}": {
                    "get": {"parameters": [{"name": "id", "in": "path"}]},
                    "put": {"parameters": [{"$ref": "#/components/parameters/IfMatch"}]}
                },
                "/v1/paged": {
                    "parameters": [{"name": "cursor", "in": "query"}],
                    "get": {}
                }
            }
        });
        let routes = QueryFreeRoutes::from_openapi(&document);
        assert!(!routes.takes_none(&Method::GET, "/v1/things"));
        assert!(routes.takes_none(&Method::POST, "/v1/things"));
        assert!(routes.takes_none(&Method::GET, "/v1/things/{id}"));
        assert!(routes.takes_none(&Method::PUT, "/v1/things/{id}"));
        assert!(!routes.takes_none(&Method::GET, "/v1/paged"));
        assert!(!routes.takes_none(&Method::GET, "/v1/unknown"));
        // Only operations count: `summary` beside them names no method.
        assert_eq!(routes.0["/v1/things"], vec![Method::POST]);
    }

    #[test]
    fn the_served_document_is_read() {
        let document: Value =
            serde_json::from_str(crate::ops::OPENAPI).expect("the OpenAPI document is JSON");
        let routes = QueryFreeRoutes::from_openapi(&document);
        assert!(routes.takes_none(&Method::POST, "/v1/events"));
        assert!(routes.takes_none(&Method::PUT, "/v1/actions/{name}"));
        assert!(!routes.takes_none(&Method::GET, "/v1/events"));
        assert!(!routes.takes_none(&Method::GET, "/v1/invocations/{id}"));
        assert!(!routes.takes_none(&Method::POST, "/mcp"));
    }
}
