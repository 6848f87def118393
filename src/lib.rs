//! stepgate: a reverse proxy that demands a fresh second factor before it
//! forwards protected routes.
//!
//! The request path reads top to bottom (outer to inner):
//! telemetry -> rescue (error -> response) -> normalise -> policy ->
//! identity -> step-up -> proxy. Each stage lives in its own module.

pub mod delivery;
pub mod policy;
pub mod store;
