//! `ablate dashboard`: prints the web dashboard's address with a login token
//! in it (opening it logs the browser in; the page then keeps a session
//! cookie), so no one copies tokens by hand.

use crate::client::{connect, status_error, token_for};

/// The login link for the dashboard at `base` (such as `http://host:7078`).
pub fn login_url(base: &str, token: Option<&str>) -> String {
    let base = base.trim_end_matches('/');
    match token {
        Some(token) => format!("{base}/login?token={token}"),
        None => format!("{base}/"),
    }
}

/// The host of a coordinator address such as `http://host:7077` (its first, when several).
fn host_of(addr: &str) -> anyhow::Result<String> {
    let first = ablate_schema::addresses(addr).map_err(|e| anyhow::anyhow!(e))?[0];
    let url = url::Url::parse(first).map_err(|e| anyhow::anyhow!("coordinator address `{first}`: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("coordinator address `{first}` names no host"))?;
    // An IPv6 host comes bracketed already.
    Ok(host.to_string())
}

pub async fn run(addr: &str, url: Option<&str>) -> anyhow::Result<()> {
    let base = match url {
        Some(url) => url.to_string(),
        None => {
            let mut client = connect(addr).await?;
            let port = client
                .dashboard(ablate_schema::proto::DashboardRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .http_port;
            if port == 0 {
                anyhow::bail!(
                    "the coordinator at {addr} serves no dashboard: start it with --http-listen ADDR (ablate up has it on 127.0.0.1:7078)"
                );
            }
            format!("http://{}:{port}", host_of(addr)?)
        }
    };
    let token = token_for(addr)?;
    println!("{}", login_url(&base, token.as_deref()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_carries_the_token_and_the_coordinators_host() {
        assert_eq!(
            login_url("http://h:7078/", Some("abl_x")),
            "http://h:7078/login?token=abl_x"
        );
        assert_eq!(login_url("http://h:7078", None), "http://h:7078/");
        assert_eq!(
            host_of("http://10.0.0.5:7077,http://10.0.0.6:7077").unwrap(),
            "10.0.0.5"
        );
        assert_eq!(host_of("https://[::1]:7077").unwrap(), "[::1]");
        assert!(host_of("").is_err());
    }
}
