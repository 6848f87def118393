//! Shared HTTP helpers used by the gateway pipeline and the step-up
//! endpoints alike: bodies, responses, content negotiation, forms, cookies,
//! and the one [`Rejection`] type every refusal is expressed in.
//!
//! Nothing here knows about the pipeline: `gateway/` and `stepup/` both
//! build on this module, and it imports neither.

pub mod body;
pub mod carried;
pub mod cookies;
pub mod form;
pub mod negotiate;
pub mod rejection;
pub mod response;

pub use self::body::{empty, full, read_limited, Body, BodyError, BoxError};
pub use self::carried::Carried;
pub use self::rejection::Rejection;
