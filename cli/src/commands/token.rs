//! `ablate login URL`, `ablate token create|list|revoke` and `ablate db reader-url`.

use ablate_schema::proto;

use crate::client::{connect, status_error, store_token};
use crate::render::table;

/// Reads a token (from `--token`, else one line of stdin) and keeps it for `addr`.
pub async fn login(addr: &str, token: Option<String>) -> anyhow::Result<()> {
    let token = match token {
        Some(t) => t,
        None => {
            eprintln!("paste the token for {addr} and press Enter:");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line
        }
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        anyhow::bail!("no token given");
    }
    let path = store_token(addr, &token, None)?;
    eprintln!("the token for {addr} is kept in {} (mode 0600)", path.display());
    Ok(())
}

/// Parses `30d`, `12h`, `45m`, `90s` or plain seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("--expires `{text}`: expected a number with d, h, m or s, such as 30d"))?;
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => anyhow::bail!("--expires `{text}`: unknown unit `{other}`; use d, h, m or s"),
    };
    Ok(n * unit)
}

pub async fn create(addr: &str, role: &str, name: Option<String>, expires: Option<String>) -> anyhow::Result<()> {
    let expires_in_s = expires.as_deref().map(parse_duration).transpose()?.unwrap_or(0);
    let mut client = connect(addr).await?;
    let created = client
        .create_token(proto::CreateTokenRequest {
            role: role.to_string(),
            name: name.unwrap_or_default(),
            expires_in_s,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    eprintln!("token `{}` ({role}) created; it is shown only now:", created.name);
    println!("{}", created.token);
    Ok(())
}

pub async fn list(addr: &str) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let tokens = client
        .list_tokens(proto::ListTokensRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .tokens;
    let header: Vec<String> = ["name", "role", "created", "expires", "revoked"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rows: Vec<Vec<String>> = tokens
        .into_iter()
        .map(|t| vec![t.name, t.role, t.created_at, t.expires_at, t.revoked_at])
        .collect();
    print!("{}", table(&header, &rows));
    Ok(())
}

pub async fn revoke(addr: &str, name: &str) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    client
        .revoke_token(proto::RevokeTokenRequest { name: name.to_string() })
        .await
        .map_err(status_error)?;
    eprintln!("token `{name}` revoked");
    Ok(())
}

/// `ablate token weight NAME W`.
pub async fn weight(addr: &str, name: &str, weight: f64) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    client
        .set_token_weight(proto::SetTokenWeightRequest {
            name: name.to_string(),
            weight,
        })
        .await
        .map_err(status_error)?;
    eprintln!("`{name}` has fair-share weight {weight}");
    Ok(())
}

/// `ablate db reader-url`.
pub async fn reader_url(addr: &str) -> anyhow::Result<()> {
    let mut client = connect(addr).await?;
    let url = client
        .reader_url(proto::ReaderUrlRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .url;
    println!("{url}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_take_units_and_refuse_others() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 12 * 3600);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("d").is_err());
    }
}
