//! The command line as people who run containerd expect it: completions and a man page from the
//! CLI definition, ctr's `-a`/`-n`, log levels, mirrors from the default hosts directory, and
//! errors that name the fix (image not found, connection refused, not root, a non-empty mount
//! directory, a plain gzip image, an unreadable docker config).

mod cli_common;
use cli_common::*;

use std::process::Command;

use lazysnap_testbed::RegistryServer;

/// Pushes an image of one layer holding `a.txt` as `repo:src`; returns its reference.
fn push_one_file_image(registry: &RegistryServer, work: &std::path::Path, repo: &str) -> String {
    push_generated(
        registry,
        work,
        &[tar_of([("a.txt".to_string(), b"a".to_vec())])],
        repo,
    )
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let script = lazysnap_ok(&["completion", shell]);
        assert!(
            script.contains("warm") && script.contains("lazysnap"),
            "{shell}: {script}"
        );
    }
    let page = lazysnap_ok(&["man"]);
    assert!(page.contains(".TH lazysnap"), "{page}");
    for sub in ["lazysnap\\-warm", "lazysnap\\-status", "lazysnap\\-serve"] {
        assert!(page.contains(sub), "{sub} missing from the man page");
    }
}

#[test]
fn containerd_flags_are_ctrs() {
    for command in ["pull", "warm"] {
        let help = lazysnap_ok(&[command, "--help"]);
        assert!(
            help.contains("-a, --address") && help.contains("-n, --namespace"),
            "{command}: {help}"
        );
        assert!(help.contains("[alias: --containerd]"), "{command}: {help}");
    }
}

#[test]
fn a_bad_log_level_is_named() {
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["--log-level", "loud", "status"])
        .env_remove("LAZYSNAP_LOG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains("--log-level \"loud\""), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "log_level = \"loud\"\n").unwrap();
    let output = lazysnap(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains("log_level") && err.contains("loud"), "{err}");
}

#[test]
fn a_missing_image_says_not_found_and_how_to_list_tags() {
    let registry = RegistryServer::start().unwrap();
    let image = format!("{}/nothing/here:v1", registry.host());
    let output = lazysnap(&["inspect", &image]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains("not found"), "{err}");
    assert!(err.contains("/v2/nothing/here/tags/list"), "{err}");
}

#[test]
fn a_refused_connection_names_the_host_and_the_mirrors_tried() {
    let dead = format!("127.0.0.1:{}", lazysnap_testbed::free_port().unwrap());
    let mirror = format!("127.0.0.1:{}", lazysnap_testbed::free_port().unwrap());
    let hosts = tempfile::tempdir().unwrap();
    let host_dir = hosts.path().join(&dead);
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!("server = \"http://{dead}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    let image = format!("{dead}/app:v1");
    let output = lazysnap(&[
        "inspect",
        "--hosts-dir",
        hosts.path().to_str().unwrap(),
        &image,
    ]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains(&dead) && err.contains("refused"), "{err}");
    assert!(err.contains(&format!("mirror {mirror}")), "{err}");
}

#[test]
fn a_plain_gzip_image_is_pointed_at_convert() {
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let source = push_one_file_image(&registry, work.path(), "plain");
    let output = lazysnap(&["inspect", &source]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(err.contains("lazysnap convert"), "{err}");
}

#[test]
fn an_unreadable_docker_config_is_a_warning_for_anonymous_pulls() {
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let source = push_one_file_image(&registry, work.path(), "anon");
    let esgz = format!("{}/anon:esgz", registry.host());
    let docker = tempfile::tempdir().unwrap();
    std::fs::write(docker.path().join("config.json"), "{ this is not json").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_lazysnap"))
        .args(["convert", &source, &esgz])
        .env("DOCKER_CONFIG", docker.path())
        .output()
        .unwrap();
    let err = stderr_of(&output);
    assert!(output.status.success(), "{err}");
    assert!(err.contains("config.json") && err.contains("WARN"), "{err}");
}

#[test]
fn commands_that_need_root_say_so() {
    require_root_and_fuse();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    for args in [
        vec!["serve", "--root", "/tmp/x-not-root"],
        vec!["mount", "127.0.0.1:1/a:b", dir.path().to_str().unwrap()],
        vec!["pull", "127.0.0.1:1/a:b"],
        vec!["warm", "127.0.0.1:1/a:b"],
    ] {
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_lazysnap"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let err = stderr_of(&output);
        assert!(
            err.contains(&format!("lazysnap {} must run as root", args[0])),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn mount_refuses_a_non_empty_directory_unless_forced() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let source = push_one_file_image(&registry, work.path(), "nonempty");
    let esgz = format!("{}/nonempty:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);
    let dir = work.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), b"mine").unwrap();
    let state = work.path().join("state");
    let cache = work.path().join("cache");
    let mount = |extra: &[&str]| {
        let mut args = vec![
            "mount",
            "--state-dir",
            state.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        args.push(&esgz);
        args.push(dir.to_str().unwrap());
        lazysnap(&args)
    };
    let output = mount(&[]);
    assert!(!output.status.success());
    let err = stderr_of(&output);
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("keep.txt")).unwrap(), b"mine");
    let output = mount(&["--force"]);
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(std::fs::read(dir.join("a.txt")).unwrap(), b"a");
    lazysnap_ok(&[
        "umount",
        "--state-dir",
        state.to_str().unwrap(),
        dir.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(dir.join("keep.txt")).unwrap(), b"mine");
}
