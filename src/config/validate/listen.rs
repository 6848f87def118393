//! `listen`: the public listener's address, TLS files and limits.

use std::time::Duration;

use super::Validator;
use crate::config::build::Build;
use crate::config::{default_workers, raw, Listen, DEFAULT_MAX_CONNECTIONS};
use crate::tls::TlsFiles;

pub(super) fn validate(v: &mut Validator<'_>, l: raw::Listen) -> Option<Listen> {
    let address = v.addr("listen.address", l.address, "0.0.0.0:8080");
    let tls = l.tls.and_then(|t| {
        let cert = v.existing_file("listen.tls.cert", &t.cert.0);
        let key = v.existing_file("listen.tls.key", &t.key.0);
        let files = TlsFiles {
            cert: cert?,
            key: key?,
        };
        v.build(Build::ListenerTls(files.clone()));
        Some(files)
    });
    let max_header_bytes = match l.max_header_bytes {
        None => 16 * 1024,
        Some(n) if (8192..=1024 * 1024).contains(&n) => n as usize,
        Some(n) => {
            v.problem(
                "listen.max_header_bytes",
                format!("{n} is out of range 8192..=1048576"),
            );
            16 * 1024
        }
    };
    let max_uri_bytes = match l.max_uri_bytes {
        None => 8 * 1024,
        Some(n) if (256..=1024 * 1024).contains(&n) => n as usize,
        Some(n) => {
            v.problem(
                "listen.max_uri_bytes",
                format!("{n} is out of range 256..=1048576"),
            );
            8 * 1024
        }
    };
    let max_connections = match l.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) if (1..=1_000_000).contains(&n) => n as usize,
        Some(n) => {
            v.problem(
                "listen.max_connections",
                format!("{n} is out of range 1..=1000000"),
            );
            DEFAULT_MAX_CONNECTIONS
        }
    };
    let workers = match l.workers {
        None => default_workers(),
        Some(n) if (1..=1024).contains(&n) => n as usize,
        Some(n) => {
            v.problem("listen.workers", format!("{n} is out of range 1..=1024"));
            default_workers()
        }
    };
    let header_read_timeout = v.duration(
        "listen.header_read_timeout",
        l.header_read_timeout,
        Duration::from_secs(10),
    );
    let drain_timeout = v.duration(
        "listen.drain_timeout",
        l.drain_timeout,
        Duration::from_secs(30),
    );
    let trusted_proxies = v.cidrs(
        "listen.trusted_proxies",
        l.trusted_proxies.unwrap_or_default(),
    );
    Some(Listen {
        address: address?,
        tls,
        max_header_bytes,
        max_uri_bytes,
        header_read_timeout,
        drain_timeout,
        trusted_proxies,
        max_connections,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};
    use std::time::Duration;

    #[test]
    // Listener limits: documented defaults, and every value out of range
    // reported at its own key, all at once.
    fn limits_default_and_each_bad_one_is_located() {
        let c = load(BASE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen.max_header_bytes, 16 * 1024);
        assert_eq!(c.listen.max_uri_bytes, 8 * 1024);
        assert_eq!(c.listen.max_connections, 10_000);
        assert_eq!(c.listen.workers, crate::config::default_workers());
        assert!(c.listen.workers >= 1);
        assert_eq!(c.listen.header_read_timeout, Duration::from_secs(10));
        assert!(c.listen.tls.is_none());
        let e = problems(&format!(
            "{BASE}listen:\n  address: nowhere\n  max_header_bytes: 10\n  max_uri_bytes: 2000000\n  max_connections: 0\n  drain_timeout: soon\n  trusted_proxies: [10.0.0.0/8, bogus]\n  tls: {{ cert: missing.crt, key: missing.key }}\n  workers: 0\n"
        ));
        for want in [
            "gateway.yaml:13:12: listen.address: invalid address \"nowhere\"",
            "gateway.yaml:14:21: listen.max_header_bytes: 10 is out of range 8192..=1048576",
            "gateway.yaml:15:18: listen.max_uri_bytes: 2000000 is out of range 256..=1048576",
            "gateway.yaml:16:20: listen.max_connections: 0 is out of range 1..=1000000",
            "gateway.yaml:17:18: listen.drain_timeout: invalid duration \"soon\"",
            "gateway.yaml:18:33: listen.trusted_proxies[1]: invalid CIDR \"bogus\"",
            "listen.tls.cert: file ",
            "listen.tls.key: file ",
            "gateway.yaml:20:12: listen.workers: 0 is out of range 1..=1024",
        ] {
            assert!(e.contains(want), "missing {want:?} in:\n{e}");
        }
    }
}
