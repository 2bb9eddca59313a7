//! TLS: certificates are verified (system roots plus `ca` from hosts.toml), `skip_verify`
//! turns verification off for one host, and a hosts.toml `server = "https://…"` overrides the
//! plain-HTTP default of loopback registries. The TLS peer is `openssl s_server -WWW`
//! serving a blob file on 127.0.0.1.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazysnap::digest::sha256_digest;
use lazysnap::registry::{Client, ClientConfig, Reference, RegistryError};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn client_with_hosts(hosts_toml: &str, host: &str, dir: &Path) -> Client {
    let hosts = dir.join("certs.d").join(host);
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(hosts.join("hosts.toml"), hosts_toml).unwrap();
    Client::new(ClientConfig {
        hosts_dir: Some(dir.join("certs.d")),
        request_timeout: Duration::from_secs(5),
        read_deadline: Duration::from_secs(5),
        max_retries: 1,
        initial_backoff: Duration::from_millis(10),
        ..ClientConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn tls_is_verified_with_ca_from_hosts_toml() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    openssl(
        d,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lazysnap-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    openssl(
        d,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
    );

    // s_server -WWW refuses paths with ':' (so blob URLs), but serves a manifest by tag.
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#.to_vec();
    let www = d.join("www");
    let manifest_dir = www.join("v2/tls/app/manifests");
    std::fs::create_dir_all(&manifest_dir).unwrap();
    std::fs::write(manifest_dir.join("v1"), &manifest).unwrap();

    let port = lazysnap_testbed::free_port().unwrap();
    let _server = Server(
        Command::new("openssl")
            .current_dir(&www)
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(d.join("server.pem"))
            .arg("-key")
            .arg(d.join("server.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "openssl s_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let host = format!("127.0.0.1:{port}");
    let reference = Reference::parse(&format!("{host}/tls/app:v1")).unwrap();

    // Trusted through `ca`.
    let ca = d.join("ca.pem");
    let trusted = client_with_hosts(
        &format!("server = \"https://{host}\"\nca = \"{}\"\n", ca.display()),
        &host,
        &d.join("trusted"),
    );
    let fetched = trusted.get_manifest(&reference).await.unwrap();
    assert_eq!(&fetched.bytes[..], &manifest[..]);
    assert_eq!(fetched.digest, sha256_digest(&manifest));
    // Its answer for a blob path is an error text with status 200: digest verification
    // turns that into a Corrupt error instead of data.
    let digest = sha256_digest(b"never served");
    let err = trusted.get_blob(&reference, &digest).await.unwrap_err();
    assert!(matches!(err, RegistryError::Corrupt(_)), "{err:?}");

    // Without the CA the certificate is refused (and the error says the registry is unusable).
    let untrusted = client_with_hosts(
        &format!("server = \"https://{host}\"\n"),
        &host,
        &d.join("untrusted"),
    );
    let err = untrusted.get_manifest(&reference).await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");

    // skip_verify accepts it.
    let skipping = client_with_hosts(
        &format!("server = \"https://{host}\"\nskip_verify = true\n"),
        &host,
        &d.join("skip"),
    );
    let fetched = skipping.get_manifest(&reference).await.unwrap();
    assert_eq!(&fetched.bytes[..], &manifest[..]);
}
