//! The CLI's connection to the coordinator, with errors that say what to do,
//! and the token it sends: `ABLATE_TOKEN`, else the one the credentials file
//! keeps for that coordinator's address (written by `ablate login`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use ablate_schema::proto::experiments_client::ExperimentsClient;
use ablate_schema::Bearer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Client = ExperimentsClient<InterceptedService<Channel, Bearer>>;

/// Connects to the first coordinator of `addr` (one address, or several
/// separated by commas: replicas serving one database) that answers.
pub async fn connect(addr: &str) -> anyhow::Result<Client> {
    let ca = std::env::var_os("ABLATE_CA").map(PathBuf::from);
    let mut failures = Vec::new();
    for one in ablate_schema::addresses(addr).map_err(|e| anyhow::anyhow!(e))? {
        let endpoint = ablate_schema::endpoint(one, ca.as_deref())
            .map_err(|e| anyhow::anyhow!(e))?
            .connect_timeout(std::time::Duration::from_secs(3));
        match endpoint.connect().await {
            Ok(channel) => {
                let token = match token_for(addr)? {
                    Some(token) => Some(token),
                    None => token_for(one)?,
                };
                let bearer = Bearer::new(token.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
                return Ok(ExperimentsClient::with_interceptor(channel, bearer).max_decoding_message_size(64 << 20));
            }
            Err(e) => failures.push(format!("{one} ({e})")),
        }
    }
    Err(anyhow::anyhow!(
        "cannot reach the coordinator at {}; start one with `ablate up`, or point --coordinator / ABLATE_COORDINATOR at yours",
        failures.join(", ")
    ))
}

/// A gRPC status as a plain error message.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

/// `$XDG_CONFIG_HOME/ablate/credentials.toml`, or `~/.config/ablate/credentials.toml`.
pub fn credentials_path() -> PathBuf {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".config"));
    config.join("ablate").join("credentials.toml")
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Credentials {
    #[serde(default)]
    coordinators: BTreeMap<String, Entry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    token: String,
    /// The coordinator's HTTP API (`/api/v1`), where clients without gRPC (the
    /// Python package's `ablate.Client`) reach it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api: Option<String>,
}

fn read_credentials() -> anyhow::Result<Credentials> {
    let path = credentials_path();
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Credentials::default()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// The token to send to `addr`: `ABLATE_TOKEN`, else the credentials file's.
pub fn token_for(addr: &str) -> anyhow::Result<Option<String>> {
    if let Ok(token) = std::env::var("ABLATE_TOKEN") {
        if !token.trim().is_empty() {
            return Ok(Some(token.trim().to_string()));
        }
    }
    Ok(read_credentials()?
        .coordinators
        .remove(addr.trim_end_matches('/'))
        .map(|e| e.token))
}

/// Keeps `token` for `addr` in the credentials file (mode 0600), with the
/// coordinator's HTTP API address when it is known (`api`), else the one kept before.
pub fn store_token(addr: &str, token: &str, api: Option<&str>) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = credentials_path();
    let mut credentials = read_credentials()?;
    let key = addr.trim_end_matches('/').to_string();
    let api = api
        .map(|a| a.trim_end_matches('/').to_string())
        .or_else(|| credentials.coordinators.get(&key).and_then(|e| e.api.clone()));
    credentials.coordinators.insert(
        key,
        Entry {
            token: token.trim().to_string(),
            api,
        },
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = toml::to_string(&credentials)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_bytes())?;
    Ok(path)
}
