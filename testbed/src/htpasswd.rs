//! htpasswd files (bcrypt) for the registry's Basic auth, and docker `config.json` files
//! holding credentials, written into test directories.

use std::path::Path;

use base64::Engine as _;

use lazysnap::rig::RigError;

/// Writes an htpasswd file with bcrypt hashes (cost 4: fast, tests only) for `users`.
pub fn write_htpasswd(path: &Path, users: &[(&str, &str)]) -> Result<(), RigError> {
    let mut text = String::new();
    for (user, password) in users {
        let hash = bcrypt::hash(password, 4).map_err(|e| RigError::Start {
            what: "htpasswd".into(),
            detail: format!("bcrypt hashing failed: {e}"),
        })?;
        text.push_str(&format!("{user}:{hash}\n"));
    }
    std::fs::write(path, text).map_err(RigError::io(format!("writing {}", path.display())))
}

/// Writes `<dir>/config.json` with `auths` entries (`"auth": base64(user:password)`) for
/// each (registry host, user, password).
pub fn write_docker_config(dir: &Path, entries: &[(&str, &str, &str)]) -> Result<(), RigError> {
    let mut auths = serde_json::Map::new();
    for (host, user, password) in entries {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        auths.insert(host.to_string(), serde_json::json!({ "auth": auth }));
    }
    let config = serde_json::json!({ "auths": auths });
    std::fs::create_dir_all(dir).map_err(RigError::io(format!("creating {}", dir.display())))?;
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(RigError::io(format!(
        "writing {}/config.json",
        dir.display()
    )))
}
