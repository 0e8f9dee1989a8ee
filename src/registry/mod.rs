//! The action registry: what AI may run on a tenant's system. Admins declare actions as
//! JSON-Schema tools over `/v1/actions` or in `schemas/actions/*.json`; every change is a new,
//! hashed version so invocations can record exactly what ran.

pub mod files;
pub mod guards;
pub mod model;
mod routes;
pub mod store;
pub mod validators;

pub use model::{ActionDeclaration, ActionName, Annotations, Approval, Mode};
pub use routes::routes;
pub use store::Action;
