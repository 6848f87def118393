//! The shipped deployment examples are valid policies: what the README and
//! deploy/ tell operators to use passes `stepgate check`.

use std::process::Command;

/// The `gateway.yaml` embedded in the sidecar ConfigMap, with its secret
/// mount paths pointed at `secrets`.
fn sidecar_config(secrets: &std::path::Path) -> String {
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/sidecar.yaml"
    ))
    .expect("manifest");
    let block = manifest
        .split("gateway.yaml: |\n")
        .nth(1)
        .and_then(|rest| rest.split("\n---").next())
        .expect("ConfigMap with gateway.yaml");
    block
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/etc/stepgate/secrets", &secrets.display().to_string())
}

#[test]
// The Kubernetes sidecar example is a valid config (with its Secret files present).
fn kubernetes_sidecar_config_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secrets = dir.path();
    std::fs::write(
        secrets.join("stepup.key"),
        "0123456789abcdef0123456789abcdef0123456789",
    )
    .expect("key");
    std::fs::write(secrets.join("smtp-password"), "pw").expect("pw");
    std::fs::write(
        secrets.join("jwks.json"),
        r#"{"keys":[{"kty":"RSA","kid":"a","alg":"RS256","e":"AQAB","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw"}]}"#,
    )
    .expect("jwks");
    let config = dir.path().join("gateway.yaml");
    std::fs::write(&config, sidecar_config(secrets)).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_stepgate"))
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("store     redis redis://redis.stepgate.svc:6379/0"),
        "{stdout}"
    );
    assert!(stdout.contains("default   identity"), "{stdout}");
}
