//! kubelet credential provider plugins: `lazysnap serve` configured with a
//! `CredentialProviderConfig` (as kubelet's) gets the credentials of a private registry (real
//! registry behind Basic auth) from the plugin and fetches the image's lazy layers with them
//! (containerd, runc, FUSE); the plugin is run once for many reads (its answer is cached for its
//! cacheDuration), and its password is in no log.

mod fixtures_common;
mod pull_common;

use std::process::Command;

use lazysnap_testbed::write_docker_config;
use pull_common::*;

const USER: &str = "robot";
const PASSWORD: &str = "provider-token-93b2f1";

#[test]
fn serve_fetches_lazy_layers_with_a_credential_provider_plugins_token() {
    require_root_and_containerd();
    let work = tempfile::tempdir().unwrap();
    let (_open, private, image) = private_registry_with_fixture(work.path(), USER, PASSWORD);

    // The plugin: answers kubelet's request with the registry's credentials, counting its runs.
    let bin_dir = work.path().join("plugins");
    std::fs::create_dir(&bin_dir).unwrap();
    let runs = work.path().join("runs");
    let plugin = bin_dir.join("test-provider");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\ncat > /dev/null\necho run >> {runs}\n\
             printf '%s' '{{\"apiVersion\":\"credentialprovider.kubelet.k8s.io/v1\",\
             \"kind\":\"CredentialProviderResponse\",\"cacheKeyType\":\"Registry\",\
             \"cacheDuration\":\"1h\",\"auth\":{{\"{host}\":{{\"username\":\"{USER}\",\
             \"password\":\"{PASSWORD}\"}}}}}}'\n",
            runs = runs.display(),
            host = private.host()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let providers = work.path().join("credential-providers.yaml");
    std::fs::write(
        &providers,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n\
             \x20 - name: test-provider\n\
             \x20   matchImages:\n\
             \x20     - \"{}\"\n\
             \x20   defaultCacheDuration: \"10m\"\n\
             \x20   apiVersion: credentialprovider.kubelet.k8s.io/v1\n",
            private.host()
        ),
    )
    .unwrap();
    let lazysnap = TestLazysnap::start_with_config(&format!(
        "[fetch]\nprefetch = false\nbackground_fill = false\nreadahead = false\n\
         [registry]\ncredential_provider_config = \"{}\"\ncredential_provider_bin_dir = \"{}\"\n",
        providers.display(),
        bin_dir.display()
    ));
    let containerd = TestContainerd::start(Some(&lazysnap.socket()));
    // `lazysnap pull` (manifest and config) reads a docker config of its own; the daemon has
    // only the plugin.
    let docker_config = work.path().join("docker");
    write_docker_config(&docker_config, &[(&private.host(), USER, PASSWORD)]).unwrap();
    let pull = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .env("DOCKER_CONFIG", &docker_config)
        .args(["pull", "--containerd"])
        .arg(containerd.socket())
        .args(["--namespace", "providers", "--snapshotter", "lazysnap"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        pull.status.success(),
        "pull failed: {}\nlazysnap log:\n{}",
        String::from_utf8_lossy(&pull.stderr),
        lazysnap.log()
    );
    for file in ["file-011", "file-012", "file-013"] {
        let out = containerd.run(
            "providers",
            "lazysnap",
            &image,
            &["cat", &format!("/data/small/{file}")],
        );
        assert_eq!(
            out,
            format!("small {}\n", file.replace('-', " ")),
            "{}",
            lazysnap.log()
        );
    }
    let (data_layer, data_size) = layer_digests("esgz")[1].clone();
    let served = private.blob_bytes_served(&data_layer);
    assert!(
        served > 0 && served < data_size,
        "the data layer should be read lazily ({served} of {data_size} bytes)\n{}",
        lazysnap.log()
    );
    let runs = std::fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(
        runs.lines().count(),
        1,
        "the plugin's answer is cached:\n{runs}"
    );
    let log = lazysnap.log();
    assert!(
        !log.contains(PASSWORD),
        "the password leaked into the log:\n{log}"
    );
}
