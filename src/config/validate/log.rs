//! `log`: format and level.

use super::Validator;
use crate::config::raw;
use crate::telemetry::{LogFormat, LogSettings};

pub(super) fn validate(v: &mut Validator<'_>, l: raw::Log) -> LogSettings {
    let format = match l.format.as_ref().map(|f| f.0.as_str()) {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            v.problem(
                "log.format",
                format!("unknown format {other:?}: expected text or json"),
            );
            LogFormat::Text
        }
    };
    let level = l.level.map(|l| l.0).unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
        v.problem("log.level", format!("invalid level {level:?}"));
    }
    LogSettings { format, level }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{load, problems, BASE};
    use crate::telemetry::LogFormat;

    #[test]
    // Log format and level: defaults, and both bad values reported.
    fn format_and_level_are_checked() {
        let c = load(BASE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        let e = problems(&format!("{BASE}log:\n  format: xml\n  level: \"info,[\"\n"));
        assert!(
            e.contains(
                "gateway.yaml:13:11: log.format: unknown format \"xml\": expected text or json"
            ),
            "{e}"
        );
        assert!(
            e.contains("gateway.yaml:14:10: log.level: invalid level"),
            "{e}"
        );
    }
}
