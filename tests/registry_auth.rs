//! Registry auth against the real Distribution registry: htpasswd Basic auth, a Bearer token
//! service (cached tokens, refresh on expiry, anonymous pull), credentials from a docker
//! config file and from a credential helper; secrets never in errors.

use std::time::Duration;

use bytes::Bytes;
use lazysnap::blob::BlobSource;
use lazysnap::digest::sha256_digest;
use lazysnap::registry::{Client, ClientConfig, Reference, RegistryError};
use lazysnap_testbed::{
    write_docker_config, write_htpasswd, RegistryOptions, RegistryServer, TokenServer,
    TokenServerOptions,
};

const PASSWORD: &str = "pw-Secret-9f3a";

fn config_with(docker_config: &std::path::Path) -> ClientConfig {
    ClientConfig {
        docker_config: Some(docker_config.to_path_buf()),
        request_timeout: Duration::from_secs(10),
        read_deadline: Duration::from_secs(20),
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        ..ClientConfig::default()
    }
}

async fn push_and_read(client: &Client, repo: &Reference) -> Result<(), RegistryError> {
    let data = Bytes::from(vec![42u8; 100_000]);
    let digest = sha256_digest(&data);
    client.push_blob_bytes(repo, &digest, data.clone()).await?;
    let blob = client.blob(repo, &digest, data.len() as u64);
    for i in 0..5u64 {
        let got = blob.read(i * 1000..i * 1000 + 512).await?;
        assert_eq!(got.len(), 512);
    }
    assert_eq!(client.get_blob(repo, &digest).await?, data);
    Ok(())
}

#[tokio::test]
async fn htpasswd_basic_auth_with_docker_config_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    write_htpasswd(&htpasswd, &[("alice", PASSWORD)]).unwrap();
    let registry = RegistryServer::start_with(&RegistryOptions {
        htpasswd: Some(htpasswd),
        ..RegistryOptions::default()
    })
    .unwrap();
    let repo = Reference::parse(&format!("{}/secure/app:v1", registry.host())).unwrap();

    let good = dir.path().join("good");
    write_docker_config(&good, &[(&registry.host(), "alice", PASSWORD)]).unwrap();
    let client = Client::new(config_with(&good)).unwrap();
    push_and_read(&client, &repo).await.unwrap();
    assert!(!format!("{client:?}").contains(PASSWORD));

    let none = dir.path().join("none");
    std::fs::create_dir_all(&none).unwrap();
    let anonymous = Client::new(config_with(&none)).unwrap();
    let err = push_and_read(&anonymous, &repo).await.unwrap_err();
    assert!(matches!(err, RegistryError::Auth(_)), "{err:?}");

    let bad = dir.path().join("bad");
    write_docker_config(&bad, &[(&registry.host(), "alice", "wrong-password")]).unwrap();
    let wrong = Client::new(config_with(&bad)).unwrap();
    let err = push_and_read(&wrong, &repo).await.unwrap_err();
    assert!(matches!(err, RegistryError::Auth(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-password"));
    assert!(!format!("{err:?}").contains("wrong-password"));
}

#[tokio::test]
async fn bearer_token_flow_caches_and_refreshes_tokens() {
    let tokens = TokenServer::start(TokenServerOptions {
        users: vec![("bob".into(), PASSWORD.into())],
        expires_in: 2,
        anonymous_pull: true,
    })
    .unwrap();
    let registry = RegistryServer::start_with(&RegistryOptions {
        extra_config: Some(tokens.registry_config()),
        ..RegistryOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    write_docker_config(&creds, &[(&registry.host(), "bob", PASSWORD)]).unwrap();
    let client = Client::new(config_with(&creds)).unwrap();
    let repo = Reference::parse(&format!("{}/tok/app:v1", registry.host())).unwrap();

    let data = Bytes::from(vec![7u8; 50_000]);
    let digest = sha256_digest(&data);
    client
        .push_blob_bytes(&repo, &digest, data.clone())
        .await
        .unwrap();
    let blob = client.blob(&repo, &digest, data.len() as u64);
    blob.read(0..10).await.unwrap();
    let after_first = tokens.tokens_issued();
    for i in 0..20u64 {
        blob.read_range(i * 100..i * 100 + 100).await.unwrap();
    }
    assert_eq!(
        tokens.tokens_issued(),
        after_first,
        "ranged reads must reuse the cached token"
    );
    // The token lives 2 s; after it expires the client fetches a new one by itself.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    blob.read(0..10).await.unwrap();
    assert_eq!(tokens.tokens_issued(), after_first + 1);

    // Anonymous: pull is granted, push is refused (classified as Auth).
    let none = dir.path().join("none");
    std::fs::create_dir_all(&none).unwrap();
    let anonymous = Client::new(config_with(&none)).unwrap();
    let got = anonymous
        .blob(&repo, &digest, data.len() as u64)
        .read(5..9)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[5..9]);
    let err = anonymous
        .push_blob_bytes(&repo, &sha256_digest(b"x"), Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Auth(_)), "{err:?}");

    // Wrong password: the token service refuses, and the password is not in the error.
    let bad = dir.path().join("bad");
    write_docker_config(&bad, &[(&registry.host(), "bob", "not-the-password")]).unwrap();
    let wrong = Client::new(config_with(&bad)).unwrap();
    let err = wrong.get_blob(&repo, &digest).await.unwrap_err();
    assert!(matches!(err, RegistryError::Auth(_)), "{err:?}");
    assert!(!err.to_string().contains("not-the-password"));
    assert!(tokens.requests_refused() >= 1);
}

#[tokio::test]
async fn credentials_from_a_credential_helper() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    write_htpasswd(&htpasswd, &[("carol", PASSWORD)]).unwrap();
    let registry = RegistryServer::start_with(&RegistryOptions {
        htpasswd: Some(htpasswd),
        ..RegistryOptions::default()
    })
    .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-lazysnap-it");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\nif [ \"$server\" = \"{}\" ]; then echo '{{\"ServerURL\":\"'$server'\",\"Username\":\"carol\",\"Secret\":\"{PASSWORD}\"}}'; else echo 'credentials not found in native keychain'; exit 1; fi\n",
            registry.host()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::env::set_var(
        "PATH",
        format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    let config_dir = dir.path().join("docker");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(
        config_dir.join("config.json"),
        r#"{"credsStore":"lazysnap-it"}"#,
    )
    .unwrap();
    let client = Client::new(config_with(&config_dir)).unwrap();
    let repo = Reference::parse(&format!("{}/helper/app:v1", registry.host())).unwrap();
    push_and_read(&client, &repo).await.unwrap();
}
