//! The client side of access control: every call carries `authorization:
//! Bearer <token>`, over TLS when the address is `https://` (verified against
//! the CA in `--ca` / `ABLATE_CA`, else the system's roots).

use tonic::metadata::{Ascii, MetadataValue};

/// Adds `authorization: Bearer <token>` to every call when there is a token,
/// and the calling span's `traceparent` when traces are on.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        let value = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| "the token holds characters a token can't hold; check ABLATE_TOKEN, --token-file or the credentials file".to_string())
            })
            .transpose()?;
        Ok(Bearer(value))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        crate::trace::inject(request.metadata_mut());
        Ok(request)
    }
}

/// An endpoint for `addr`: TLS for `https://` addresses, trusting the PEM CA
/// certificate in `ca` if given, else the system's roots.
pub fn endpoint(addr: &str, ca: Option<&std::path::Path>) -> Result<tonic::transport::Endpoint, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let endpoint = Endpoint::from_shared(addr.to_string()).map_err(|e| format!("coordinator address `{addr}`: {e}"))?;
    if !addr.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("CA certificate {}: {e}", path.display()))?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_native_roots(),
    };
    endpoint.tls_config(tls).map_err(|e| format!("TLS for {addr}: {e}"))
}

/// How often a connection to the coordinator is pinged (HTTP/2 PING), busy or
/// idle, and how long a ping may go unanswered before the connection is taken
/// for dead: its calls fail (workers retry them on a new connection) instead of
/// hanging behind a dead link until TCP gives up, many minutes later.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A lazy channel to the coordinator at `addrs`: one address, or several
/// separated by commas (replicas serving one database). With several, calls
/// are spread over them, and a call to one that is down fails and is retried
/// (as every worker call is), so the others carry on without it.
pub fn channel(
    addrs: &str,
    ca: Option<&std::path::Path>,
    connect_timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, String> {
    let endpoints = addresses(addrs)?
        .into_iter()
        .map(|a| {
            endpoint(a, ca).map(|e| {
                e.connect_timeout(connect_timeout)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match endpoints.len() {
        1 => endpoints.into_iter().next().expect("one endpoint").connect_lazy(),
        _ => tonic::transport::Channel::balance_list(endpoints.into_iter()),
    })
}

/// The addresses in `addrs` (comma-separated); an empty list is an error.
pub fn addresses(addrs: &str) -> Result<Vec<&str>, String> {
    let list: Vec<&str> = addrs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    if list.is_empty() {
        return Err(format!(
            "`{addrs}` names no coordinator; give an address such as http://127.0.0.1:7077"
        ));
    }
    Ok(list)
}
