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
