//! Unit tests of registry authorization: challenges, tokens, credentials.

use base64::Engine as _;

use super::*;

#[test]
fn parses_bearer_and_basic_challenges() {
    let c = parse_challenges(
        r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
    );
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].scheme, "bearer");
    assert_eq!(c[0].params["realm"], "https://auth.example.com/token");
    assert_eq!(c[0].params["scope"], "repository:a/b:pull,push");
    let c = parse_challenges(r#"Basic realm="x \"q\"", Bearer realm=http://t/token"#);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].params["realm"], "x \"q\"");
    assert_eq!(c[1].params["realm"], "http://t/token");
    assert!(parse_challenges("").is_empty());
    assert!(parse_challenges("=\",,").is_empty());
}

#[test]
fn credentials_debug_is_redacted() {
    let c = Credentials::Basic {
        username: "u".into(),
        password: "hunter2".into(),
    };
    assert!(!format!("{c:?}").contains("hunter2"));
    let t = Credentials::IdentityToken("tok-secret".into());
    assert!(!format!("{t:?}").contains("tok-secret"));
}

#[tokio::test]
async fn docker_config_auths_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        dir.path().join("config.json"),
        format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{encoded}"}},"127.0.0.1:5000":{{"username":"bob","password":"pw"}}}}}}"#
        ),
    )
    .unwrap();
    let config = DockerConfig::load(Some(dir.path())).unwrap();
    assert!(!format!("{config:?}").contains("s3cret"));
    assert_eq!(
        config.credentials_for("docker.io").await.unwrap(),
        Some(Credentials::Basic {
            username: "alice".into(),
            password: "s3cret".into()
        })
    );
    assert!(config
        .credentials_for("127.0.0.1:5000")
        .await
        .unwrap()
        .is_some());
    assert!(config.credentials_for("ghcr.io").await.unwrap().is_none());
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    assert!(matches!(
        DockerConfig::load(Some(dir.path())),
        Err(RegistryError::Config(_))
    ));
}

#[tokio::test]
async fn credential_helper_is_run() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("docker-credential-lazysnaptest");
    std::fs::write(
        &bin,
        "#!/bin/sh\nread server\necho \"{\\\"ServerURL\\\":\\\"$server\\\",\\\"Username\\\":\\\"helperuser\\\",\\\"Secret\\\":\\\"helperpw\\\"}\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"credHelpers":{"example.com":"lazysnaptest"}}"#,
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // The helper is found through PATH; set it for this process only.
    std::env::set_var("PATH", path);
    let config = DockerConfig::load(Some(dir.path())).unwrap();
    assert_eq!(
        config.credentials_for("example.com").await.unwrap(),
        Some(Credentials::Basic {
            username: "helperuser".into(),
            password: "helperpw".into()
        })
    );
}
