//! Real parts for integration tests: redis-server, an SMTP server, HTTP
//! upstreams and the gateway itself, each on a 127.0.0.1 port chosen by the
//! OS and stopped when dropped.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod flow;
pub mod gateway;
pub mod http_sink;
pub mod oidc;
pub mod redis;
pub mod smtp;
pub mod upstream;
