//! `store`: in memory, one Redis, or a Redis cluster.

use super::Validator;
use crate::config::build::Build;
use crate::config::raw;
use crate::store::Settings;

pub(super) fn validate(v: &mut Validator<'_>, s: raw::Store) -> Option<Settings> {
    let before = v.problems.len();
    let store = settings(v, s)?;
    if v.problems.len() > before {
        return None;
    }
    v.build(Build::Store(store.clone()));
    Some(store)
}

fn settings(v: &mut Validator<'_>, s: raw::Store) -> Option<Settings> {
    let prefix = s.prefix.map(|p| p.0).unwrap_or_else(|| "stepgate:".into());
    let redis_used = s.redis.is_some() || s.redis_cluster.is_some();
    if redis_used {
        if let Err(e) = crate::store::redis::check_prefix(&prefix) {
            v.problem("store.prefix", e);
        }
    }
    match (s.redis, s.redis_cluster) {
        (Some(_), Some(_)) => {
            v.problem("store", "give either redis or redis_cluster, not both");
            None
        }
        (Some(url), None) => {
            if !(url.0.starts_with("redis://")
                || url.0.starts_with("rediss://")
                || url.0.starts_with("unix://"))
            {
                v.problem(
                    "store.redis",
                    format!(
                        "invalid Redis URL {:?}: expected redis://host:port/db",
                        url.0
                    ),
                );
                return None;
            }
            if let Err(e) = redis::Client::open(url.0.as_str()) {
                v.problem("store.redis", format!("invalid Redis URL: {e}"));
                return None;
            }
            let ca_file = s
                .ca_file
                .and_then(|f| v.existing_file("store.ca_file", &f.0));
            if ca_file.is_some() && !url.0.starts_with("rediss://") {
                v.problem("store.ca_file", "only applies to rediss:// (TLS) URLs");
            }
            Some(Settings::Redis {
                url: url.0,
                prefix,
                ca_file,
            })
        }
        (None, Some(urls)) => {
            if urls.is_empty() {
                v.problem("store.redis_cluster", "must list at least one node");
            }
            for (i, url) in urls.iter().enumerate() {
                if let Err(e) = redis::Client::open(url.0.as_str()) {
                    v.problem(
                        &format!("store.redis_cluster[{i}]"),
                        format!("invalid Redis URL: {e}"),
                    );
                }
            }
            if s.ca_file.is_some() {
                v.problem(
                    "store.ca_file",
                    "applies to store.redis only, not to redis_cluster",
                );
            }
            Some(Settings::Cluster {
                urls: urls.into_iter().map(|u| u.0).collect(),
                prefix,
            })
        }
        (None, None) => {
            if s.ca_file.is_some() {
                v.problem("store.ca_file", "applies to store.redis only");
            }
            Some(Settings::Memory {
                max_entries: s.max_entries.unwrap_or(100_000) as usize,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};
    use crate::store::Settings;

    #[test]
    // One store only, each URL checked where it is written.
    fn store_kinds_and_urls_are_checked() {
        let c = load(&format!(
            "{BASE}store:\n  redis: redis://127.0.0.1:6379/0\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(c.store, Settings::Redis { ref prefix, .. } if prefix == "stepgate:"));
        let e = problems(&format!(
            "{BASE}store:\n  redis: redis://127.0.0.1:6379/0\n  redis_cluster: [redis://127.0.0.1:7000]\n"
        ));
        assert!(
            e.contains("store: give either redis or redis_cluster, not both"),
            "{e}"
        );
        let e = problems(&format!("{BASE}store:\n  redis: http://127.0.0.1:6379\n"));
        assert!(
            e.contains(
                "gateway.yaml:13:10: store.redis: invalid Redis URL \"http://127.0.0.1:6379\""
            ),
            "{e}"
        );
        let e = problems(&format!("{BASE}store:\n  redis_cluster: []\n"));
        assert!(
            e.contains("store.redis_cluster: must list at least one node"),
            "{e}"
        );
    }
}
